"""The executor-manager's metrics (docs/metrics.md): its slots, read at each scrape."""

from __future__ import annotations

from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from libs.metrics import Collected
from services.executor_manager.pool import WorkerPool


def watch(pool: WorkerPool,
          registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
    def collect() -> Iterable[Metric]:
        yield GaugeMetricFamily("weir_executor_slots", "Attempts this executor-manager runs "
                                "at once: worker processes × slots each.", value=pool.capacity)
        yield GaugeMetricFamily("weir_executor_slots_in_use",
                                "Slots running an attempt (sent to a worker, not yet reported).",
                                value=pool.busy_slots)
        yield GaugeMetricFamily("weir_executor_slots_reserved", "Free slots kept for HIGH "
                                "attempts (NORMAL and LOW never take them).",
                                value=pool.high_reserve)
        yield GaugeMetricFamily("weir_executor_attempts_waiting", "Attempts taken from a "
                                "dispatcher that wait in the pool for a slot.",
                                value=pool.queued)

    registry.register(Collected(collect))
