"""Tasks of paused functions, held with the Kafka message that queued them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cassandra.cluster import Session
from weir.storage.v1 import records_pb2


class ParkedStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._insert = session.prepare(
            "INSERT INTO parked_tasks (tenant_id, function, task_id, message) VALUES (?, ?, ?, ?)")
        self._delete = session.prepare(
            "DELETE FROM parked_tasks WHERE tenant_id = ? AND function = ? AND task_id = ?")
        self._select = session.prepare(
            "SELECT message FROM parked_tasks WHERE tenant_id = ? AND function = ?")
        self._delete_function = session.prepare(
            "DELETE FROM parked_tasks WHERE tenant_id = ? AND function = ?")

    def park(self, message: records_pb2.TaskMessage) -> None:
        self._session.execute(self._insert, (message.tenant_id, message.function,
                                             message.task_id, message.SerializeToString()))

    def unpark(self, message: records_pb2.TaskMessage) -> None:
        self._session.execute(self._delete, (message.tenant_id, message.function,
                                             message.task_id))

    def unpark_many(self, messages: Iterable[records_pb2.TaskMessage]) -> None:
        """`unpark` of many tasks, concurrently."""
        futures = [self._session.execute_async(self._delete, (m.tenant_id, m.function,
                                                              m.task_id)) for m in messages]
        for future in futures:
            future.result()

    def forget_function(self, tenant_id: str, function: str) -> None:
        """Drops every parked task of a deleted function (one partition delete)."""
        self._session.execute(self._delete_function, (tenant_id, function))

    def parked(self, tenant_id: str, function: str, *, page_size: int = 500
               ) -> Iterator[records_pb2.TaskMessage]:
        """Every parked task of the function, read page by page."""
        statement = self._select.bind((tenant_id, function))
        statement.fetch_size = page_size
        for row in self._session.execute(statement):
            yield records_pb2.TaskMessage.FromString(row.message)


