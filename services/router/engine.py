"""Routes: each (tenant, function) gets a shuffle shard of the task partitions."""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cassandra.cluster import Session
from weir.internal.router.v1 import router_pb2
from weir.v1 import common_pb2

from libs.cassandra.taskstate import now_utc, timestamp_of
from libs.errors import NotFound, excerpt
from libs.kafka.topics import task_topic

log = logging.getLogger(__name__)

TIERS: dict[int, str] = {
    common_pb2.Priority.PRIORITY_HIGH: "high",
    common_pb2.Priority.PRIORITY_NORMAL: "normal",
    common_pb2.Priority.PRIORITY_LOW: "low",
}


def shuffle_shard(tenant_id: str, function: str, *, partitions: int, shard_size: int
                  ) -> list[int]:
    """k distinct partitions out of N, chosen by a hash of (tenant, function).

    Deterministic, so every router computes the same shard without coordination. Two pairs
    share their whole shard with probability 1 / C(N, k): with N = 16, k = 2 that is 1/120, so
    one tenant flooding its partitions fully blocks almost no one else.
    """
    seed = hashlib.sha256(f"{tenant_id}\x00{function}".encode()).digest()
    return sorted(random.Random(seed).sample(range(partitions), min(shard_size, partitions)))


@dataclass(frozen=True)
class _Stored:
    """A route as stored."""

    partitions: list[int]
    version: int
    home: list[int]  # while moved: the shard it goes back to
    move_reason: str
    move_time: datetime | None


class RouteTable:
    """Routes stored in Cassandra and cached in memory; hot tenants moved to partitions of
    their own (`move`), by the router's `Isolator`.

    A new route gets a shuffle shard of the shared partitions (``partitions``), or, while its
    tenant is moved, the tenant's own partitions (with its shard as home). One router moves
    routes (several would need a leader).
    """

    def __init__(self, session: Session, *, topic_prefix: str, partitions: int,
                 shard_size: int, tenant_exists: Callable[[str], bool]) -> None:
        self._session = session
        self._tenant_exists = tenant_exists
        self._prefix = topic_prefix
        self._partitions = partitions
        self._shard_size = shard_size
        columns = "partitions, version, home, move_reason, move_time"
        self._insert = session.prepare(
            "INSERT INTO routes (tenant_id, function, topic, partitions, version, home, "
            "move_reason, move_time) VALUES (?, ?, ?, ?, 1, ?, ?, ?) IF NOT EXISTS")
        self._select = session.prepare(
            f"SELECT {columns} FROM routes WHERE tenant_id = ? AND function = ?")
        self._select_all = session.prepare(
            f"SELECT function, {columns} FROM routes WHERE tenant_id = ?")
        self._move = session.prepare(
            "UPDATE routes SET partitions = ?, home = ?, version = ?, move_reason = ?, "
            "move_time = ? WHERE tenant_id = ? AND function = ? IF version = ?")
        self._isolate = session.prepare(
            "INSERT INTO isolated_tenants (scope, tenant_id, partitions, reason, move_time) "
            "VALUES ('isolated', ?, ?, ?, ?)")
        self._unisolate = session.prepare(
            "DELETE FROM isolated_tenants WHERE scope = 'isolated' AND tenant_id = ?")
        self._select_isolated = session.prepare(
            "SELECT tenant_id, partitions, reason, move_time FROM isolated_tenants "
            "WHERE scope = 'isolated'")
        self._cache: dict[tuple[str, str], _Stored] = {}
        # tenant -> its own partitions, the reason and the time of its move
        self._isolated: dict[str, tuple[list[int], str, datetime]] = {}
        # Changes with every move (gateways then drop their cached routes); random at start,
        # so a restarted router never repeats an earlier one.
        self.generation = random.getrandbits(62)
        self._lock = threading.Lock()

    def route(self, tenant_id: str, function: str, priority: int) -> router_pb2.Route:
        key = (tenant_id, function)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._load_or_assign(tenant_id, function)
            with self._lock:
                self._cache[key] = cached
        return self._route(tenant_id, function, priority, cached)

    def routes(self, tenant_id: str) -> list[router_pb2.Route]:
        rows = self._session.execute(self._select_all, (tenant_id,))
        return [self._route(tenant_id, r.function, common_pb2.Priority.PRIORITY_NORMAL,
                            _stored(r)) for r in rows]

    def isolated(self) -> dict[str, list[int]]:
        """The tenants moved to partitions of their own, and those partitions."""
        with self._lock:
            return {t: list(p) for t, (p, _, _) in self._isolated.items()}

    def load_isolated(self) -> dict[str, list[int]]:
        """Reads the moved tenants (at start) and finishes any move a crash interrupted."""
        rows = list(self._session.execute(self._select_isolated))
        with self._lock:
            self._isolated = {r.tenant_id: (list(r.partitions), r.reason or "", r.move_time)
                              for r in rows}
        for row in rows:
            self._move_routes(row.tenant_id, list(row.partitions), row.reason or "",
                              row.move_time)
        return self.isolated()

    def move(self, tenant_id: str, partitions: Sequence[int] | None, reason: str) -> None:
        """Moves every route of the tenant to ``partitions``, or back home when None. New
        submissions follow once gateways see the new `generation`; queued tasks stay."""
        now = now_utc()
        if partitions is not None:
            self._session.execute(self._isolate, (tenant_id, list(partitions), reason, now))
            with self._lock:
                self._isolated[tenant_id] = (list(partitions), reason, now)
        else:
            with self._lock:
                self._isolated.pop(tenant_id, None)
        try:
            self._move_routes(tenant_id, None if partitions is None else list(partitions),
                              reason, now)
            if partitions is None:
                self._session.execute(self._unisolate, (tenant_id,))
        finally:
            with self._lock:
                for key in [k for k in self._cache if k[0] == tenant_id]:
                    del self._cache[key]
                self.generation += 1

    def _move_routes(self, tenant_id: str, partitions: list[int] | None, reason: str,
                     at: datetime) -> None:
        for row in self._session.execute(self._select_all, (tenant_id,)):
            stored = _stored(row)
            if partitions is not None:
                target, home = partitions, stored.home or stored.partitions
            elif stored.home:
                target, home = stored.home, []
            else:
                continue  # never moved
            if stored.partitions == target:
                continue
            applied = self._session.execute(self._move, (
                target, home or None, stored.version + 1, reason, at, tenant_id, row.function,
                stored.version)).was_applied
            if not applied:  # only the router writes routes: another router is running
                log.warning("a route changed while it was moved; left as it is", extra={
                    "tenant_id": tenant_id, "function": row.function})

    def _load_or_assign(self, tenant_id: str, function: str) -> _Stored:
        row = self._session.execute(self._select, (tenant_id, function)).one()
        if row is None:
            if not self._tenant_exists(tenant_id):  # a route is assigned to tenants only
                raise NotFound(f"tenant {excerpt(tenant_id)} does not exist",
                               reason="TENANT_NOT_FOUND")
            shard = shuffle_shard(tenant_id, function, partitions=self._partitions,
                                  shard_size=self._shard_size)
            with self._lock:
                isolated = self._isolated.get(tenant_id)
            stored = _Stored(shard, 1, [], "", None) if isolated is None else \
                _Stored(isolated[0], 1, shard, isolated[1], isolated[2])
            result = self._session.execute(self._insert, (
                tenant_id, function, "", stored.partitions, stored.home or None,
                stored.move_reason or None, stored.move_time))
            if result.was_applied:
                return stored
            row = result.one()  # another router assigned it first: its answer stands
        return _stored(row)

    def _route(self, tenant_id: str, function: str, priority: int, stored: _Stored
               ) -> router_pb2.Route:
        tier = TIERS.get(priority, "normal")
        route = router_pb2.Route(tenant_id=tenant_id, function=function,
                                 topic=task_topic(self._prefix, tier),
                                 partitions=stored.partitions, version=stored.version,
                                 home_partitions=stored.home, move_reason=stored.move_reason)
        if stored.move_time is not None:
            route.move_time.CopyFrom(timestamp_of(stored.move_time))
        return route


def _stored(row: Any) -> _Stored:
    return _Stored(list(row.partitions), row.version, list(row.home or []),
                   row.move_reason or "", row.move_time)
