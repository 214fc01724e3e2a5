"""Functions in Cassandra, one partition per tenant, ordered by name."""

from __future__ import annotations

from cassandra.cluster import Session
from weir.storage.v1 import records_pb2
from weir.v1 import functions_pb2

from libs.cassandra.taskstate import now_utc, timestamp_of


class FunctionStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO functions (tenant_id, name, state, update_time, record) "
                         "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS")
        self._update = p("UPDATE functions SET state = ?, update_time = ?, record = ? "
                         "WHERE tenant_id = ? AND name = ? IF EXISTS")
        self._select = p("SELECT state, record FROM functions WHERE tenant_id = ? AND name = ?")
        self._list = p("SELECT state, record FROM functions WHERE tenant_id = ? AND name > ? "
                       "LIMIT ?")
        self._delete = p("DELETE FROM functions WHERE tenant_id = ? AND name = ? IF EXISTS")

    def create(self, tenant_id: str, function: functions_pb2.Function) -> bool:
        """Stores a new function (ACTIVE); False when the name is taken."""
        now = now_utc()
        function.state = functions_pb2.FunctionState.FUNCTION_STATE_ACTIVE
        function.create_time.CopyFrom(timestamp_of(now))
        function.update_time.CopyFrom(timestamp_of(now))
        record = records_pb2.FunctionRecord(tenant_id=tenant_id, function=function)
        return self._session.execute(self._insert, (
            tenant_id, function.name, function.state, now, record.SerializeToString())).was_applied

    def update(self, tenant_id: str, function: functions_pb2.Function) -> bool:
        """Replaces a function's settings and state; False when it does not exist."""
        now = now_utc()
        function.update_time.CopyFrom(timestamp_of(now))
        record = records_pb2.FunctionRecord(tenant_id=tenant_id, function=function)
        return self._session.execute(self._update, (
            function.state, now, record.SerializeToString(), tenant_id,
            function.name)).was_applied

    def get(self, tenant_id: str, name: str) -> functions_pb2.Function | None:
        row = self._session.execute(self._select, (tenant_id, name)).one()
        return self._function(row) if row else None

    def list(self, tenant_id: str, *, after: str, limit: int) -> list[functions_pb2.Function]:
        """Functions named after ``after`` (exclusive), by name."""
        return [self._function(r) for r in self._session.execute(self._list,
                                                                   (tenant_id, after, limit))]

    def delete(self, tenant_id: str, name: str) -> bool:
        return self._session.execute(self._delete, (tenant_id, name)).was_applied

    @staticmethod
    def _function(row) -> functions_pb2.Function:
        function = records_pb2.FunctionRecord.FromString(row.record).function
        function.state = row.state
        return function
