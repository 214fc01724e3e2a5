"""Claims of client-chosen keys (task IDs, request IDs), each granted to exactly one task."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cassandra.cluster import Session


@dataclass(frozen=True)
class Claim:
    """Outcome of a claim: ``granted`` for the first claimant; ``task_id`` is the owner's."""

    granted: bool
    task_id: str


class DedupStore:
    """Grants each (tenant, key) to the first task that claims it, for a window (TTL).

    The claim is a lightweight transaction (Paxos), so among any number of concurrent
    claimants across processes exactly one wins, and every loser learns the winner.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._claim = session.prepare(
            "INSERT INTO dedup_keys (tenant_id, dedup_key, task_id, create_time) "
            "VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?")
        self._select = session.prepare(
            "SELECT task_id FROM dedup_keys WHERE tenant_id = ? AND dedup_key = ?")
        self._release = session.prepare(
            "DELETE FROM dedup_keys WHERE tenant_id = ? AND dedup_key = ? IF task_id = ?")
        self._remaining = session.prepare(
            "SELECT task_id, TTL(task_id) AS ttl FROM dedup_keys "
            "WHERE tenant_id = ? AND dedup_key = ?")
        self._extend = session.prepare(
            "UPDATE dedup_keys USING TTL ? SET task_id = ?, create_time = ? "
            "WHERE tenant_id = ? AND dedup_key = ? IF task_id = ?")

    def claim(self, tenant_id: str, key: str, task_id: str, *, window: timedelta) -> Claim:
        ttl = int(window.total_seconds())
        if ttl <= 0:
            raise ValueError("the dedup window must be at least one second")
        result = self._session.execute(
            self._claim, (tenant_id, key, task_id, datetime.now(UTC), ttl))
        if result.was_applied:
            return Claim(True, task_id)
        return Claim(False, result.one().task_id)

    def owner(self, tenant_id: str, key: str) -> str | None:
        row = self._session.execute(self._select, (tenant_id, key)).one()
        return row.task_id if row else None

    def release(self, tenant_id: str, key: str, task_id: str) -> bool:
        """Gives the key up, only if ``task_id`` still holds it (a failed create undoes it)."""
        return self._session.execute(self._release, (tenant_id, key, task_id)).was_applied

    def hold(self, tenant_id: str, key: str, task_id: str, *, at_least: timedelta) -> None:
        """Keeps the key claimed by ``task_id`` for ``at_least`` from now (longer if its claim
        already lasts longer), claiming it again if it had expired."""
        row = self._session.execute(self._remaining, (tenant_id, key)).one()
        ttl = int(at_least.total_seconds())
        if row is not None and (row.task_id != task_id or (row.ttl or 0) >= ttl):
            return  # held long enough (or by another task: nothing of ours to extend)
        now = datetime.now(UTC)
        if row is None or not self._session.execute(
                self._extend, (ttl, task_id, now, tenant_id, key, task_id)).was_applied:
            self._session.execute(self._claim, (tenant_id, key, task_id, now, ttl))
