"""Attempt logs in Cassandra (`attempt_logs`): what each attempt's handler wrote.

The owner of a task's partition writes an attempt's log in the flush that stores the
attempt's outcome (`services.dispatcher.engine.Flusher`), beside the task's own write and at
the same owner timestamp, with a TTL of the retention setting. Only attempts that wrote
something have a row. The gateway reads them (`TaskService.GetAttemptLog`,
`ListAttemptLogs`) and deletes them with their task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cassandra.cluster import ResponseFuture, Session
from weir.v1 import tasks_pb2

from libs.cassandra.taskstate import DELETE_AHEAD, micros, now_utc, timestamp_of

DEFAULT_RETENTION = timedelta(days=7)
COLUMNS = "attempt_number, output, truncated, original_bytes, end_time, expire_time"


@dataclass(frozen=True)
class AttemptLogWrite:
    """One attempt's log, to store."""

    tenant_id: str
    task_id: str
    attempt_number: int
    text: str
    truncated: bool
    original_bytes: int
    end_time: datetime  # when the attempt ended


@dataclass(frozen=True)
class StoredLog:
    """One attempt's log as stored."""

    attempt_number: int
    text: str
    truncated: bool
    original_bytes: int
    end_time: datetime | None
    expire_time: datetime | None

    def to_proto(self, task_id: str) -> tasks_pb2.AttemptLog:
        log = tasks_pb2.AttemptLog(task_id=task_id, attempt_number=self.attempt_number,
                                   text=self.text, truncated=self.truncated,
                                   original_bytes=self.original_bytes)
        if self.end_time is not None:
            log.create_time.CopyFrom(timestamp_of(self.end_time))
        if self.expire_time is not None:
            log.expire_time.CopyFrom(timestamp_of(self.expire_time))
        return log


class AttemptLogWriter(Protocol):
    """What the dispatcher's flusher needs: a write that returns a future."""

    def write(self, entry: AttemptLogWrite, *, timestamp: int) -> Any:
        """Starts the write (``timestamp``: the owner's, microseconds); the result has
        ``result()``, which raises if it failed."""


def _aware(value: datetime | None) -> datetime | None:
    """The driver reads timestamps as naive UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class AttemptLogStore:
    """Reads and writes `attempt_logs`."""

    def __init__(self, session: Session, *, retention: timedelta = DEFAULT_RETENTION) -> None:
        self._session = session
        self._retention = retention
        p = session.prepare
        self._insert = p(
            "INSERT INTO attempt_logs (tenant_id, task_id, attempt_number, output, truncated, "
            "original_bytes, end_time, expire_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TTL ? AND TIMESTAMP ?")
        self._select = p(f"SELECT {COLUMNS} FROM attempt_logs WHERE tenant_id = ? "
                         "AND task_id = ? AND attempt_number = ?")
        self._select_from = p(f"SELECT {COLUMNS} FROM attempt_logs WHERE tenant_id = ? "
                              "AND task_id = ? AND attempt_number >= ? LIMIT ?")
        self._delete = p("DELETE FROM attempt_logs USING TIMESTAMP ? "
                         "WHERE tenant_id = ? AND task_id = ?")

    @property
    def retention(self) -> timedelta:
        return self._retention

    def write(self, entry: AttemptLogWrite, *, timestamp: int) -> ResponseFuture:
        """Stores a log until the retention ends, at the owner's write ``timestamp``."""
        ttl = max(1, int(self._retention.total_seconds()))
        return self._session.execute_async(self._insert, (
            entry.tenant_id, entry.task_id, entry.attempt_number, entry.text, entry.truncated,
            entry.original_bytes, entry.end_time, now_utc() + timedelta(seconds=ttl), ttl,
            timestamp))

    def get_async(self, tenant_id: str, task_id: str, attempt_number: int) -> ResponseFuture:
        """One attempt's log; `stored_of` reads the answer."""
        return self._session.execute_async(self._select, (tenant_id, task_id, attempt_number))

    def get(self, tenant_id: str, task_id: str, attempt_number: int) -> StoredLog | None:
        return self.stored_of(self.get_async(tenant_id, task_id, attempt_number).result())

    @staticmethod
    def stored_of(rows: Any) -> StoredLog | None:
        row = next(iter(rows), None)
        return None if row is None else _log_of(row)

    def list(self, tenant_id: str, task_id: str, *, start: int, limit: int,
             fetch_size: int = 8) -> Iterator[StoredLog]:
        """A task's logs from attempt ``start`` on, at most ``limit``, oldest first; read
        ``fetch_size`` at a time as the caller goes (logs are up to the cap each)."""
        bound = self._select_from.bind((tenant_id, task_id, start, limit))
        bound.fetch_size = fetch_size
        for row in self._session.execute(bound):
            yield _log_of(row)

    def delete(self, tenant_id: str, task_id: str) -> None:
        """Deletes a task's logs for good, above every owner's write timestamps (as
        `TaskStateStore.delete`)."""
        self._session.execute(self._delete, (micros(now_utc() + DELETE_AHEAD), tenant_id,
                                             task_id))


def _log_of(row: Any) -> StoredLog:
    return StoredLog(attempt_number=row.attempt_number, text=row.output or "",
                     truncated=bool(row.truncated), original_bytes=row.original_bytes or 0,
                     end_time=_aware(row.end_time), expire_time=_aware(row.expire_time))
