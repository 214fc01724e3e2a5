"""The dispatcher's metrics (docs/metrics.md): what its owner decides about each task.

Per-task updates are few and cheap (one cached lookup, the increments): at dispatch, under the
owner's lock, a counter and the queue-time histogram (`dispatched`); the outcomes and dead
letters once their flush is durable, on the flusher's thread, counted per batch (`outcomes`,
`dead_lettered`). Gauges of what waits, runs and is unread are read at each scrape (`watch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.taskstate import StoredTask
from libs.metrics import TENANT_LABELS, TIME_BUCKETS, Collected, PerTenant, TenantLabels

State = tasks_pb2.TaskState
PartitionId = tuple[str, int]
# An outcome's state -> the index of its counter among `_ends`' families.
ENDS = {State.TASK_STATE_SUCCEEDED: 0, State.TASK_STATE_FAILED: 1,
        State.TASK_STATE_RETRY_WAIT: 2, State.TASK_STATE_EXPIRED: 3,
        State.TASK_STATE_CANCELLED: 4}
RUN_SECONDS = 5  # the index of the run-time histogram among `_ends`' families


class Waiting(Protocol):
    def partition_backlog(self) -> dict[PartitionId, int]: ...
    def out(self) -> int: ...


class Unread(Protocol):
    def records(self) -> dict[PartitionId, int]: ...


class DispatcherMetrics:
    def __init__(self, *, labels: TenantLabels,
                 registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
        self._registry = registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, TENANT_LABELS, registry=registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, TENANT_LABELS, buckets=TIME_BUCKETS, registry=registry)

        self._dispatch = PerTenant(labels, counter(
            "weir_tasks_dispatched_total", "Attempts sent out to an executor."), histogram(
            "weir_task_queue_seconds", "Time from when a task was due to run (created, its "
            "schedule_time, or its retry's due time) to its dispatch."))
        self._ends = PerTenant(
            labels,
            counter("weir_tasks_succeeded_total", "Tasks that ended SUCCEEDED."),
            counter("weir_tasks_failed_total",
                    "Tasks that ended FAILED (not retryable, or out of retries)."),
            counter("weir_tasks_retried_total",
                    "Attempts that failed and left their task to be retried (RETRY_WAIT)."),
            counter("weir_tasks_expired_total", "Tasks that ended EXPIRED."),
            counter("weir_tasks_cancelled_total", "Tasks that ended CANCELLED."),
            histogram("weir_task_run_seconds",
                      "Run time of an attempt: its start to its end, as its executor "
                      "reported them."))
        self._dead = PerTenant(labels, counter(
            "weir_tasks_dead_lettered_total", "Tasks written to the dead letters."))

    def dispatched(self, tenant: str, function: str, waited: float) -> None:
        """An attempt goes out, ``waited`` seconds after its task was due."""
        counter, histogram = self._dispatch.of(tenant, function)
        counter.inc()
        histogram.observe(waited if waited > 0 else 0.0)  # clocks of two hosts

    def outcomes(self, outcomes: Iterable[records_pb2.AttemptOutcome]) -> None:
        """Outcomes written and about to be published: counted by state, one increment per
        (tenant, function, state) in the batch; each ended attempt's run time observed."""
        counts: dict[tuple[str, str, int], int] = {}
        for outcome in outcomes:
            index = ENDS.get(outcome.state)
            if index is None:
                continue
            key = (outcome.tenant_id, outcome.function, index)
            counts[key] = counts.get(key, 0) + 1
            attempt = outcome.attempt
            if attempt.HasField("start_time") and attempt.HasField("end_time"):
                start, end = attempt.start_time, attempt.end_time
                run = (end.seconds - start.seconds) + (end.nanos - start.nanos) / 1e9
                self._ends.of(key[0], key[1])[RUN_SECONDS].observe(run if run > 0 else 0.0)
        for (tenant, function, index), n in counts.items():
            self._ends.of(tenant, function)[index].inc(n)

    def dead_lettered(self, stored: Iterable[StoredTask]) -> None:
        self._dead.count((task.spec.tenant_id, task.spec.task.function) for task in stored)

    def watch(self, *, owner: Waiting, unread: Unread, priorities: Mapping[str, str]) -> None:
        """Gauges read at each scrape: tasks waiting by priority (``priorities``: task topic
        -> tier name), attempts out, and the owned partitions' unread records."""

        def collect() -> Iterable[Metric]:
            queued = GaugeMetricFamily(
                "weir_tasks_queued", "Tasks this dispatcher took from Kafka that wait for an "
                "executor's slot or a rate limit (unread records: weir_consumer_lag_records).",
                labels=["priority"])
            tiers = dict.fromkeys(priorities.values(), 0)
            for (topic, _), waiting in owner.partition_backlog().items():
                if topic in priorities:
                    tiers[priorities[topic]] += waiting
            for tier, waiting in tiers.items():
                queued.add_metric([tier], waiting)
            yield queued
            yield GaugeMetricFamily(
                "weir_tasks_running", "Attempts out at executors (dispatched or running).",
                value=owner.out())
            lag = GaugeMetricFamily(
                "weir_consumer_lag_records", "Records of an owned task partition not read yet "
                "(its end offset less the consumer's position; refreshed every second).",
                labels=["topic", "partition"])
            for (topic, partition), records in sorted(unread.records().items()):
                lag.add_metric([topic, str(partition)], records)
            yield lag

        self._registry.register(Collected(collect))
