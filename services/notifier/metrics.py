"""The notifier's metrics (docs/metrics.md): webhook deliveries."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

from libs.metrics import TIME_BUCKETS

# What became of one webhook POST (or of a target refused without one).
OUTCOMES = ("delivered", "retried", "failed", "refused")


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
        deliveries = Counter(
            "weir_webhook_deliveries_total", "Webhook delivery attempts by outcome: delivered "
            "(2xx), retried (a retryable failure; tried again later), failed (given up: not "
            "retryable, or the last attempt), refused (a target never attempted: a bad "
            "header or a Kafka target).", ["outcome"], registry=registry)
        # Children made up front: every outcome shows from the first scrape, at 0.
        self._outcomes = {outcome: deliveries.labels(outcome) for outcome in OUTCOMES}
        self._seconds = Histogram(
            "weir_webhook_request_seconds", "Duration of one webhook POST, answered or not.",
            buckets=TIME_BUCKETS, registry=registry)

    def delivery(self, outcome: str) -> None:
        self._outcomes[outcome].inc()

    def request(self, seconds: float) -> None:
        self._seconds.observe(seconds)
