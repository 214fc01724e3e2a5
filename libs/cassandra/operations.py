"""Long-running operations in Cassandra, with the owner that works on each.

An operation is owned by one gateway at a time: the owner writes a heartbeat with every
checkpoint; an operation whose heartbeat went silent is claimed (compare-and-set on the
heartbeat seen) by another gateway, which resumes from the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cassandra.cluster import Session
from weir.storage.v1 import records_pb2

from libs.cassandra.session import NewestFirst
from libs.cassandra.taskstate import now_utc

ACTIVE_BUCKET = 0  # few operations run at once: one partition lists them


@dataclass
class StoredOperation:
    record: records_pb2.OperationRecord
    owner: str | None
    heartbeat: datetime | None
    cancel_requested: bool


class OperationStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO operations (tenant_id, name, record) VALUES (?, ?, ?) "
                         "IF NOT EXISTS")
        self._insert_active = p(
            "INSERT INTO active_operations (bucket, tenant_id, name) VALUES (?, ?, ?)")
        self._select = p("SELECT record, owner, heartbeat, cancel_requested FROM operations "
                         "WHERE tenant_id = ? AND name = ?")
        self._select_active = p(
            "SELECT tenant_id, name FROM active_operations WHERE bucket = ?")
        self._claim = p("UPDATE operations SET owner = ?, heartbeat = ? "
                        "WHERE tenant_id = ? AND name = ? IF heartbeat = ?")
        self._save = p("UPDATE operations SET record = ?, heartbeat = ? "
                       "WHERE tenant_id = ? AND name = ? IF owner = ?")
        self._request_cancel = p("UPDATE operations SET cancel_requested = true "
                                 "WHERE tenant_id = ? AND name = ?")
        self._insert_by_time = p(
            "INSERT INTO operations_by_time (tenant_id, create_time, name) VALUES (?, ?, ?)")
        self._by_time = NewestFirst.prepare(
            session, "SELECT create_time, name FROM operations_by_time", time="create_time",
            key="name")
        self._delete_active = p(
            "DELETE FROM active_operations WHERE bucket = ? AND tenant_id = ? AND name = ?")

    def create(self, record: records_pb2.OperationRecord) -> bool:
        """Stores a new operation and lists it as active; False when the name exists.

        The record is written first: a runner that finds a listed operation without its
        record takes it for a finished one and unlists it."""
        tenant_id, name = record.tenant_id, record.operation.name
        if not self._session.execute(self._insert, (
                tenant_id, name, record.SerializeToString())).was_applied:
            return False
        self._session.execute(self._insert_by_time, (
            tenant_id, record.operation.create_time.ToDatetime(tzinfo=UTC), name))
        self.activate(tenant_id, name)
        return True

    def activate(self, tenant_id: str, name: str) -> None:
        """Lists an operation for the runners (again: idempotent)."""
        self._session.execute(self._insert_active, (ACTIVE_BUCKET, tenant_id, name))

    def get(self, tenant_id: str, name: str) -> StoredOperation | None:
        row = self._session.execute(self._select, (tenant_id, name)).one()
        if row is None:
            return None
        return StoredOperation(
            records_pb2.OperationRecord.FromString(row.record), row.owner,
            row.heartbeat.replace(tzinfo=UTC) if row.heartbeat else None,
            bool(row.cancel_requested))

    def page(self, tenant_id: str, *, after: tuple[datetime, str] | None, limit: int
             ) -> list[tuple[datetime, str]]:
        """(create_time, name) of a tenant's operations newest first, after ``after`` (the
        last row of the previous page)."""
        rows = self._by_time.page(self._session, tenant_id, after=after, limit=limit)
        return [(r.create_time.replace(tzinfo=UTC), r.name) for r in rows]

    def active(self) -> list[tuple[str, str]]:
        return [(r.tenant_id, r.name)
                for r in self._session.execute(self._select_active, (ACTIVE_BUCKET,))]

    def claim(self, stored: StoredOperation, *, owner: str) -> bool:
        """Takes the operation if its heartbeat is still the one read."""
        record = stored.record
        return self._session.execute(self._claim, (
            owner, now_utc(), record.tenant_id, record.operation.name,
            stored.heartbeat)).was_applied

    def save(self, record: records_pb2.OperationRecord, *, owner: str) -> bool:
        """Checkpoints progress (and the heartbeat); False when another owner took over."""
        return self._session.execute(self._save, (
            record.SerializeToString(), now_utc(), record.tenant_id, record.operation.name,
            owner)).was_applied

    def request_cancel(self, tenant_id: str, name: str) -> None:
        self._session.execute(self._request_cancel, (tenant_id, name))

    def deactivate(self, tenant_id: str, name: str) -> None:
        self._session.execute(self._delete_active, (ACTIVE_BUCKET, tenant_id, name))
