"""Admission control: fair back-pressure at the gateway.

When the dispatchers' backlog (tasks taken from Kafka and waiting for a slot, plus an estimate
of those still unread there, reported to the router) passes a threshold, submissions are
refused RESOURCE_EXHAUSTED with RetryInfo and a QuotaFailure — aimed at the tenants causing
it, not at everyone:

- a tenant with more than `WEIR_ADMISSION_TENANT_BACKLOG` tasks waiting is refused;
- past `WEIR_ADMISSION_BACKLOG` waiting in all, a tenant sending more than its fair share of
  the recent submissions is refused, its share estimated by sample-and-hold (Estan and
  Varghese): cheap, and exact enough for the heavy hitters, which are the ones that matter.

Nothing is refused after it was accepted: the check comes before anything is stored.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
from weir.internal.router.v1 import router_pb2, router_pb2_grpc

from libs.errors import ResourceExhausted

log = logging.getLogger(__name__)
RETRY_AFTER = timedelta(seconds=1)
BACKLOG_POLL_SECONDS = 0.5
STALE_SECONDS = 5.0


@dataclass(frozen=True)
class BacklogView:
    """What waits across the dispatchers, as the router last said."""

    waiting: int = 0
    tenants: dict[str, int] = field(default_factory=dict)  # those near their threshold


class SampleAndHold:
    """Each tenant's share of recent submissions, by sample-and-hold: a submission of n tasks
    is sampled with probability 1 − (1 − p)^n; once a tenant is sampled, every task it sends
    for the rest of the interval is counted. A tenant sending at a rate r is found within
    about 1/(p·r) seconds; memory holds only tenants found. Shares are of the last full
    interval and the current one together."""

    def __init__(self, *, probability: float = 0.01, interval: float = 5.0,
                 capacity: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self._p = probability
        self._interval = interval
        self._capacity = capacity
        self._clock = clock
        self._rng = rng
        self._current: Counter[str] = Counter()
        self._previous: Counter[str] = Counter()
        self._started = clock()
        self._lock = threading.Lock()

    def add(self, tenant_id: str, tasks: int) -> None:
        with self._lock:
            self._roll()
            if tenant_id in self._current:
                self._current[tenant_id] += tasks
            elif len(self._current) < self._capacity and \
                    self._rng() < 1 - (1 - self._p) ** tasks:
                self._current[tenant_id] = tasks

    def share(self, tenant_id: str) -> tuple[float, int]:
        """The tenant's share of the counted submissions, and how many tenants were found."""
        with self._lock:
            self._roll()
            counts = self._previous + self._current
        total = counts.total()
        return (counts[tenant_id] / total if total else 0.0), len(counts)

    def _roll(self) -> None:
        now = self._clock()
        if now - self._started >= self._interval:
            # A whole silent interval (or more) leaves nothing to remember.
            self._previous = self._current if now - self._started < 2 * self._interval \
                else Counter()
            self._current = Counter()
            self._started = now


class Admission:
    """Decides whether a tenant's submission of n tasks is admitted now."""

    def __init__(self, *, backlog_threshold: int, tenant_threshold: int,
                 sampler: SampleAndHold | None = None) -> None:
        self._threshold = backlog_threshold
        self.tenant_threshold = tenant_threshold
        self._sampler = sampler or SampleAndHold()
        self._view = BacklogView()

    def update(self, view: BacklogView) -> None:
        """The router's latest backlog (a poller calls this every half second)."""
        self._view = view

    def admit(self, tenant_id: str, tasks: int) -> None:
        """Raises:
            ResourceExhausted: the tenant is over its backlog, or sends more than its fair
                share while the whole backlog is over its threshold.
        """
        self._sampler.add(tenant_id, tasks)  # refused ones too: a flood stays a flood
        view = self._view
        waiting = view.tenants.get(tenant_id, 0)
        if waiting >= self.tenant_threshold:
            raise ResourceExhausted(
                f"this tenant has {waiting:,} tasks waiting to run, past its "
                f"{self.tenant_threshold:,}; retry once they drain",
                retry_after=RETRY_AFTER, reason="TENANT_BACKLOG", subject=f"tenant:{tenant_id}",
                metadata={"waiting": str(waiting), "threshold": str(self.tenant_threshold)})
        if view.waiting < self._threshold:
            return
        share, tenants = self._sampler.share(tenant_id)
        if tenants > 1 and share > 1 / tenants:
            raise ResourceExhausted(
                f"Weir is backlogged ({view.waiting:,} tasks waiting) and this tenant sent "
                f"{share:.0%} of the recent submissions, more than its fair share "
                f"({1 / tenants:.0%}); retry later", retry_after=RETRY_AFTER,
                reason="SYSTEM_BACKLOG", subject=f"tenant:{tenant_id}",
                metadata={"waiting": str(view.waiting), "threshold": str(self._threshold)})


class BacklogPoller:
    """Keeps an `Admission` fed with the router's backlog, and the routing with the busy
    partitions and the routes' generation (``on_routes``). A router silent for
    `STALE_SECONDS` leaves admission open: it protects the queues, it is not needed for
    correctness, so an outage of it refuses no one."""

    def __init__(self, *, router: router_pb2_grpc.RouterServiceStub, admission: Admission,
                 on_routes: Callable[[int, dict[tuple[str, int], int]], None] | None = None,
                 busy_partition: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._router = router
        self._admission = admission
        self._on_routes = on_routes
        self._busy_partition = busy_partition
        self._clock = clock
        self._heard = clock()

    def poll(self) -> None:
        try:
            backlog = self._router.GetBacklog(router_pb2.GetBacklogRequest(
                min_tenant_waiting=self._admission.tenant_threshold,
                min_partition_waiting=self._busy_partition), timeout=1)
        except grpc.RpcError as exc:
            if self._clock() - self._heard >= STALE_SECONDS:
                self._admission.update(BacklogView())
                log.warning("no backlog from the router: admitting everything", extra={
                    "code": exc.code().name if exc.code() else ""})
            return
        self._heard = self._clock()
        self._admission.update(BacklogView(
            backlog.waiting, {t.tenant_id: t.waiting for t in backlog.tenants}))
        if self._on_routes is not None:
            self._on_routes(backlog.route_generation, {
                (p.topic, p.partition): p.waiting for p in backlog.partitions})
