"""Weir's Kafka topics, created idempotently: ``python -m libs.kafka.topics``."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from kafka.admin import KafkaAdminClient, NewPartitions, NewTopic
from kafka.errors import TopicAlreadyExistsError

from libs import config as weir_config

log = logging.getLogger(__name__)

# Task topics, one per priority tier; the dispatcher reads the higher tiers first.
PRIORITY_TIERS = ("high", "normal", "low")


# Task records carry payloads of up to 1 MiB plus their envelope: above Kafka's 1 MB default.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


def task_topic(prefix: str, tier: str) -> str:
    return f"{prefix}.tasks.{tier}"


def results_topic(prefix: str) -> str:
    return f"{prefix}.results"


def dead_letter_topic(prefix: str) -> str:
    return f"{prefix}.dead-letters"


def weir_topics(config: weir_config.WeirConfig) -> list[TopicSpec]:
    """Every topic the suite needs, sized from the config."""
    prefix = config.topic_prefix
    return [
        *(TopicSpec(task_topic(prefix, tier), config.task_partitions + config.isolated_partitions)
          for tier in PRIORITY_TIERS),
        TopicSpec(results_topic(prefix), max(config.task_partitions // 2, 1)),
        TopicSpec(dead_letter_topic(prefix), max(config.task_partitions // 4, 1)),
    ]


def ensure_topics(*, bootstrap: str, specs: list[TopicSpec], replication_factor: int) -> list[str]:
    """Creates the topics that do not exist yet, and adds partitions to those that have fewer
    than their spec (a topic never shrinks); returns the names it created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="weir-topics")
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        present = {s.name: s.partitions for s in specs if s.name in existing}
        if present:
            grow = {d["name"]: NewPartitions(present[d["name"]])
                    for d in admin.describe_topics(list(present))
                    if len(d["partitions"]) < present[d["name"]]}
            if grow:
                log.info("adding partitions", extra={"topics": sorted(grow)})
                admin.create_partitions(grow, timeout_ms=30_000)
        if missing:
            # Another process may create them between our list and create: that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [NewTopic(s.name, s.partitions, replication_factor,
                              topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)})
                     for s in missing],
                    timeout_ms=30_000, wait_for_metadata=True)
        return [s.name for s in missing]
    finally:
        admin.close()


def main() -> None:
    config = weir_config.load()
    created = ensure_topics(bootstrap=config.kafka_bootstrap, specs=weir_topics(config),
                            replication_factor=config.replication_factor)
    print(f"topics: created {len(created)}" + (f" ({', '.join(created)})" if created else "")
          + f", {len(weir_topics(config)) - len(created)} already present")


if __name__ == "__main__":
    main()
