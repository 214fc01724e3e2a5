"""The gateway's metrics (docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter
from weir.storage.v1 import records_pb2

from libs.metrics import TENANT_LABELS, PerTenant, TenantLabels


class GatewayMetrics:
    def __init__(self, *, labels: TenantLabels,
                 registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
        self._accepted = PerTenant(labels, Counter(
            "weir_tasks_accepted_total", "Tasks the gateway accepted: stored, so they will "
            "run (counted once stored, before they are on Kafka).", TENANT_LABELS,
            registry=registry))

    def accepted(self, specs: Iterable[records_pb2.TaskSpec]) -> None:
        """A submission's tasks are stored: one increment per (tenant, function) in it."""
        self._accepted.count((spec.tenant_id, spec.task.function) for spec in specs)
