"""Dead letters in Cassandra: tasks that failed for good, by task and newest first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cassandra.cluster import ResponseFuture, Session
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, dead_letters_pb2

from libs.cassandra.session import NewestFirst
from libs.cassandra.taskstate import StoredTask, timestamp_of


@dataclass(frozen=True)
class DeadLetterRow:
    """A listing row: enough to filter without reading the dead letter."""

    dead_letter_time: datetime
    task_id: str
    function: str
    error_class: int


def dead_letter_of(stored: StoredTask, *, when: datetime) -> dead_letters_pb2.DeadLetter:
    """The dead letter of a task that failed for good: its input (a re-drive's replacement,
    if any), its attempts and last status."""
    task, status = stored.spec.task, stored.status
    attempts = stored.attempts()
    return dead_letters_pb2.DeadLetter(
        task_id=task.task_id, function=task.function, payload=stored.payload,
        dead_letter_time=timestamp_of(when), last_status=status.last_status,
        error_class=attempts[-1].error_class if attempts else common_pb2.ERROR_CLASS_UNSPECIFIED,
        attempts=attempts, redrive_count=status.redrive_count)


class DeadLetterStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO dead_letters (tenant_id, task_id, dead_letter_time, record) "
                         "VALUES (?, ?, ?, ?)")
        self._insert_by_time = p(
            "INSERT INTO dead_letters_by_time (tenant_id, dead_letter_time, task_id, function, "
            "error_class) VALUES (?, ?, ?, ?, ?)")
        self._select = p("SELECT record FROM dead_letters WHERE tenant_id = ? AND task_id = ?")
        self._by_time = NewestFirst.prepare(
            session, "SELECT dead_letter_time, task_id, function, error_class "
            "FROM dead_letters_by_time", time="dead_letter_time", key="task_id")
        self._delete = p("DELETE FROM dead_letters WHERE tenant_id = ? AND task_id = ?")
        self._delete_by_time = p("DELETE FROM dead_letters_by_time WHERE tenant_id = ? "
                                 "AND dead_letter_time = ? AND task_id = ?")

    def put(self, stored: StoredTask, *, when: datetime) -> None:
        """Files a failed task; idempotent for the same ``when``."""
        for future in self.put_async(stored, when=when):
            future.result()

    def put_async(self, stored: StoredTask, *, when: datetime) -> list[ResponseFuture]:
        """`put`, for a caller that waits for many writes at once."""
        letter = dead_letter_of(stored, when=when)
        tenant_id = stored.spec.tenant_id
        record = records_pb2.DeadLetterRecord(tenant_id=tenant_id, dead_letter=letter)
        when = letter.dead_letter_time.ToDatetime(tzinfo=UTC)
        return [
            self._session.execute_async(self._insert_by_time, (
                tenant_id, when, letter.task_id, letter.function, letter.error_class)),
            self._session.execute_async(self._insert, (tenant_id, letter.task_id, when,
                                                       record.SerializeToString())),
        ]

    def get(self, tenant_id: str, task_id: str) -> dead_letters_pb2.DeadLetter | None:
        row = self._session.execute(self._select, (tenant_id, task_id)).one()
        return records_pb2.DeadLetterRecord.FromString(row.record).dead_letter if row else None

    def page(self, tenant_id: str, *, after: tuple[datetime, str] | None, limit: int
             ) -> list[DeadLetterRow]:
        """Listing rows newest first, after ``after`` (the last row of the previous page)."""
        rows = self._by_time.page(self._session, tenant_id, after=after, limit=limit)
        return [DeadLetterRow(r.dead_letter_time.replace(tzinfo=UTC), r.task_id, r.function,
                              r.error_class) for r in rows]

    def remove(self, letter: dead_letters_pb2.DeadLetter, tenant_id: str) -> None:
        self._session.execute(self._delete_by_time, (
            tenant_id, letter.dead_letter_time.ToDatetime(tzinfo=UTC), letter.task_id))
        self._session.execute(self._delete, (tenant_id, letter.task_id))
