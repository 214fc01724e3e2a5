"""The router's metrics (docs/metrics.md): the cluster's backlog as the dispatchers report
it, and the tenants moved to partitions of their own; read at each scrape."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from libs.metrics import Collected
from services.router.backlog import Backlogs
from services.router.hot import HotTenants


def watch(*, backlogs: Backlogs, hot: HotTenants, priorities: Mapping[str, str],
          registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
    """``priorities``: task topic -> tier name."""

    def collect() -> Iterable[Metric]:
        backlog = GaugeMetricFamily(
            "weir_backlog_tasks", "Tasks waiting across all dispatchers, taken from Kafka or "
            "estimated unread there, as they last reported it (every 250 ms).",
            labels=["priority"])
        tiers = dict.fromkeys(priorities.values(), 0)
        for (topic, _), waiting in backlogs.partitions(min_waiting=1).items():
            if topic in priorities:
                tiers[priorities[topic]] += waiting
        for tier, waiting in tiers.items():
            backlog.add_metric([tier], waiting)
        yield backlog
        yield GaugeMetricFamily("weir_isolated_tenants", "Tenants moved to partitions of "
                                "their own for their backlog.", value=hot.isolated_count)

    registry.register(Collected(collect))
