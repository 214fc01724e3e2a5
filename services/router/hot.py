"""Which tenants to move off the shared partitions, and when to move them back.

A tenant whose backlog (all its functions, as the dispatchers report it) stays at or past
``threshold`` for ``hold`` seconds gets ``shard_size`` partitions of its own from the pool
(the partitions each task topic has beyond the shared ones), while the pool has free ones;
once its backlog stays at or under ``drained`` for ``hold`` seconds it goes back. Both
conditions must hold without a break, so a backlog hovering at a threshold does not make the
route flap. Nothing here does I/O: the router's `Isolator` applies the moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from services.router.backlog import Backlogs
from services.router.engine import RouteTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    """Move ``tenant_id`` to ``partitions`` (of its own), or back home when None."""

    tenant_id: str
    partitions: tuple[int, ...] | None
    reason: str


class HotTenants:
    def __init__(self, *, pool: Sequence[int], shard_size: int, threshold: int, drained: int,
                 hold: float, clock: Callable[[], float]) -> None:
        if drained >= threshold:
            raise ValueError("a moved tenant's drained backlog must be below the hot threshold")
        self._pool = list(pool)
        self._shard_size = shard_size
        self._threshold = threshold
        self._drained = drained
        self._hold = hold
        self._clock = clock
        self._isolated: dict[str, tuple[int, ...]] = {}
        self._since: dict[str, float] = {}  # when a tenant's condition (hot, or drained) began

    def restore(self, isolated: Mapping[str, Sequence[int]]) -> None:
        """The tenants moved before (as stored), e.g. after a restart of the router."""
        self._isolated = {t: tuple(p) for t, p in isolated.items()}
        self._since.clear()

    def isolated(self) -> dict[str, tuple[int, ...]]:
        return dict(self._isolated)

    @property
    def isolated_count(self) -> int:
        """Tenants moved now (safe to read from another thread)."""
        return len(self._isolated)

    def observe(self, backlog: Mapping[str, int]) -> list[Move]:
        """The moves to make now, given each tenant's backlog (absent: none waiting)."""
        now = self._clock()
        moves: list[Move] = []
        watching: set[str] = set()
        for tenant, waiting in sorted(backlog.items(), key=lambda item: -item[1]):
            if tenant in self._isolated or waiting < self._threshold:
                continue
            watching.add(tenant)
            since = self._since.setdefault(tenant, now)
            if now - since < self._hold:
                continue
            partitions = self._free()
            if partitions is None:
                continue  # the pool is taken: it stays on its shard (watched again each time)
            self._isolated[tenant] = partitions
            del self._since[tenant]
            watching.discard(tenant)
            moves.append(Move(tenant, partitions, (
                f"backlog {waiting:,} at or past {self._threshold:,} for "
                f"{self._hold:g} s: moved to partitions of its own")))
        for tenant in list(self._isolated):
            waiting = backlog.get(tenant, 0)
            if waiting > self._drained:
                continue
            watching.add(tenant)
            since = self._since.setdefault(tenant, now)
            if now - since < self._hold:
                continue
            del self._isolated[tenant], self._since[tenant]
            watching.discard(tenant)
            moves.append(Move(tenant, None, (
                f"backlog {waiting:,} at or under {self._drained:,} for {self._hold:g} s: "
                "moved back to its shared partitions")))
        for tenant in set(self._since) - watching:
            del self._since[tenant]  # its condition broke: the clock starts again
        return moves

    def _free(self) -> tuple[int, ...] | None:
        taken = {p for partitions in self._isolated.values() for p in partitions}
        free = [p for p in self._pool if p not in taken]
        return tuple(free[:self._shard_size]) if len(free) >= self._shard_size else None


class Isolator:
    """Moves hot tenants once a second: the backlog in, the route table's moves out."""

    def __init__(self, *, hot: HotTenants, routes: RouteTable, backlogs: Backlogs) -> None:
        self._hot = hot
        self._routes = routes
        self._backlogs = backlogs
        hot.restore(routes.load_isolated())

    def step(self) -> None:
        _, tenants = self._backlogs.view(min_tenant_waiting=1, most=100_000)
        for move in self._hot.observe(dict(tenants)):
            try:
                self._routes.move(move.tenant_id, move.partitions, move.reason)
            except Exception:
                # What is stored stands; a tenant still hot is moved after another hold.
                log.exception("could not move a tenant's routes",
                              extra={"tenant_id": move.tenant_id})
                self._hot.restore(self._routes.isolated())
                return
            log.info("tenant moved", extra={
                "tenant_id": move.tenant_id, "reason": move.reason,
                "partitions": list(move.partitions or [])})
