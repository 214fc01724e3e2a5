"""Prometheus metrics: the endpoint each service serves, and labels of bounded cardinality.

Every service serves its metrics in the Prometheus text format on
``WEIR_<SERVICE>_METRICS_PORT`` (9464–9468), on ``WEIR_INTERNAL_BIND_HOST`` (127.0.0.1 by
default), over plain HTTP or, with ``WEIR_METRICS_TLS``, HTTPS with mutual TLS; from
`libs.service.run`, before the service starts (`serve`). docs/metrics.md lists every metric.

Metrics by tenant and function go through one `TenantLabels` per process: it admits the first
``WEIR_METRICS_MAX_TENANT_LABELS`` distinct (tenant, function) pairs it sees and maps every
later one to ``tenant="other", function="other"``, so a tenant flood cannot blow up the series
a process exposes. `PerTenant` caches the label children of such families together, so a
per-task update costs one dict lookup and the increments.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from libs import tls
from libs.config import WeirConfig

OTHER = "other"
TENANT_LABELS = ("tenant", "function")
# Seconds, 1 ms to 15 min: a fast task's wait and run are milliseconds; waits behind a
# backlog, slow handlers and retries' delays are seconds to minutes (beyond: +Inf).
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0, 900.0)


class TenantLabels:
    """The (tenant, function) label values to use for a pair: itself for the first ``limit``
    distinct pairs this process sees, ``("other", "other")`` for any pair after them.

    Admission is first come, for the life of the process (a pair admitted stays admitted, so
    its series never jump to "other"); a restart starts afresh. Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("the label limit must be >= 0")
        self._limit = limit
        self._admitted: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def __call__(self, tenant: str, function: str) -> tuple[str, str]:
        pair = (tenant, function)
        found = self._admitted.get(pair)
        if found is not None:
            return found
        if len(self._admitted) >= self._limit:
            return OTHER, OTHER  # not remembered: the overflow stays O(1) in memory
        with self._lock:
            if len(self._admitted) >= self._limit:
                return OTHER, OTHER
            return self._admitted.setdefault(pair, pair)

    @property
    def admitted(self) -> int:
        """Pairs admitted so far (at most the limit)."""
        return len(self._admitted)

    @property
    def limit(self) -> int:
        return self._limit


class PerTenant:
    """Families labelled (tenant, function), updated together: `of` returns each family's
    child for a pair, made once and cached (a tuple, in the families' order).

    A pair beyond the `TenantLabels` limit gets the children of ("other", "other"); the
    cache holds only admitted pairs and "other", so it stays bounded too.
    """

    def __init__(self, labels: TenantLabels, *families: Any) -> None:
        self._labels = labels
        self._families = families
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def of(self, tenant: str, function: str) -> tuple[Any, ...]:
        children = self._children.get((tenant, function))
        if children is None:
            children = self._make(tenant, function)
        return children

    def _make(self, tenant: str, function: str) -> tuple[Any, ...]:
        shown = self._labels(tenant, function)
        children = self._children.get(shown)
        if children is None:
            # Racing threads make the same children: `labels` returns one child per values.
            children = tuple(family.labels(*shown) for family in self._families)
            self._children[shown] = children
        return children

    def count(self, pairs: Iterable[tuple[str, str]], family: int = 0) -> None:
        """Adds one per pair to the counter ``family``: one `inc(n)` per distinct pair."""
        counts: dict[tuple[str, str], int] = {}
        for pair in pairs:
            counts[pair] = counts.get(pair, 0) + 1
        for (tenant, function), n in counts.items():
            self.of(tenant, function)[family].inc(n)


class Collected(Collector):
    """A collector whose families are made at each scrape by ``collect`` (gauges of state
    the service already keeps: queues, slots, lag), so nothing is updated per task."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


@dataclass
class Exporter:
    """The metrics endpoint of a process."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def port_of(config: WeirConfig, service: str) -> int:
    """The configured metrics port of a service (``executor-manager`` or ``executor_manager``)."""
    return config.metrics_port_of(service.replace("-", "_"))


def serve(config: WeirConfig, service: str,
          registry: CollectorRegistry = prometheus_client.REGISTRY) -> Exporter | None:
    """Serves ``registry`` at ``/metrics`` (any path, in fact) on the service's metrics port
    and the internal bind host; None when ``WEIR_METRICS_ENABLED`` is false. With
    ``WEIR_METRICS_TLS``, over HTTPS with the service's certificate (``service`` is its
    identity, e.g. ``executor-manager``), to clients with a certificate of the deployment CA.

    Raises:
        OSError: the port cannot be bound (taken, or not allowed).
        tls.MissingCredentials: TLS is asked for and the credentials are not there.
    """
    if not config.metrics_enabled:
        return None
    # `_created` series double every counter and histogram for a timestamp Prometheus
    # itself does not use.
    prometheus_client.disable_created_metrics()
    secured: dict[str, Any] = {}
    if config.metrics_tls:
        identity = service.replace("_", "-")
        tls.Credentials.of(config, identity)  # every file there, or what to run to make them
        directory = tls.credentials_dir(config)
        secured = {"certfile": str(directory / f"{identity}.pem"),
                   "keyfile": str(directory / f"{identity}-key.pem"),
                   "client_cafile": str(directory / "ca.pem"), "client_auth_required": True}
    server, thread = prometheus_client.start_http_server(
        port_of(config, service), addr=config.internal_bind_host, registry=registry,
        **secured)
    thread.name = "metrics"
    return Exporter(server, thread)
