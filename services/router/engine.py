"""Routes: each (tenant, function) gets a shuffle shard of the task partitions."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable

from cassandra.cluster import Session
from weir.internal.router.v1 import router_pb2
from weir.v1 import common_pb2

from libs.errors import NotFound, excerpt
from libs.kafka.topics import task_topic

TIERS = {
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


class RouteTable:
    """Routes stored in Cassandra (so an operator can move a tenant) and cached in memory."""

    def __init__(self, session: Session, *, topic_prefix: str, partitions: int,
                 shard_size: int, tenant_exists: Callable[[str], bool]) -> None:
        self._session = session
        self._tenant_exists = tenant_exists
        self._prefix = topic_prefix
        self._partitions = partitions
        self._shard_size = shard_size
        self._insert = session.prepare(
            "INSERT INTO routes (tenant_id, function, topic, partitions, version) "
            "VALUES (?, ?, ?, ?, 1) IF NOT EXISTS")
        self._select = session.prepare(
            "SELECT partitions, version FROM routes WHERE tenant_id = ? AND function = ?")
        self._select_all = session.prepare(
            "SELECT function, partitions, version FROM routes WHERE tenant_id = ?")
        self._cache: dict[tuple[str, str], tuple[list[int], int]] = {}
        self._lock = threading.Lock()

    def route(self, tenant_id: str, function: str, priority: int) -> router_pb2.Route:
        key = (tenant_id, function)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._load_or_assign(tenant_id, function)
            with self._lock:
                self._cache[key] = cached
        partitions, version = cached
        return self._route(tenant_id, function, priority, partitions, version)

    def routes(self, tenant_id: str) -> list[router_pb2.Route]:
        rows = self._session.execute(self._select_all, (tenant_id,))
        return [self._route(tenant_id, r.function, common_pb2.Priority.PRIORITY_NORMAL,
                            list(r.partitions), r.version) for r in rows]

    def _load_or_assign(self, tenant_id: str, function: str) -> tuple[list[int], int]:
        row = self._session.execute(self._select, (tenant_id, function)).one()
        if row is None:
            if not self._tenant_exists(tenant_id):  # a route is assigned to tenants only
                raise NotFound(f"tenant {excerpt(tenant_id)} does not exist",
                               reason="TENANT_NOT_FOUND")
            shard = shuffle_shard(tenant_id, function, partitions=self._partitions,
                                  shard_size=self._shard_size)
            result = self._session.execute(self._insert, (
                tenant_id, function, "", shard))
            if result.was_applied:
                return shard, 1
            row = result.one()  # another router assigned it first: its answer stands
        return list(row.partitions), row.version

    def _route(self, tenant_id, function, priority, partitions, version) -> router_pb2.Route:
        tier = TIERS.get(priority, "normal")
        return router_pb2.Route(tenant_id=tenant_id, function=function,
                                topic=task_topic(self._prefix, tier), partitions=partitions,
                                version=version)
