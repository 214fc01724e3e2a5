"""Timers in Cassandra: tasks due at a time, bucketed by shard and minute.

A timer is a promise to look at a task at `due_time`; the task's own row says whether there
is anything left to do (a timer of a cancelled task finds it final and is simply dropped).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cassandra.cluster import Session

SHARDS = 4
MINUTE = timedelta(minutes=1)


def shard_of(tenant_id: str, task_id: str) -> int:
    return zlib.crc32(f"{tenant_id}/{task_id}".encode()) % SHARDS


def minute_of(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


def to_millis(when: datetime) -> datetime:
    """``when`` at Cassandra's precision, so a time read back compares equal."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Timer:
    tenant_id: str
    task_id: str
    due_time: datetime
    kind: int  # weir.storage.v1.TimerKind

    @property
    def shard(self) -> int:
        return shard_of(self.tenant_id, self.task_id)


class TimerStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO timers (shard, minute, due_time, tenant_id, task_id, kind) "
                         "VALUES (?, ?, ?, ?, ?, ?)")
        self._select = p("SELECT due_time, tenant_id, task_id, kind FROM timers "
                         "WHERE shard = ? AND minute = ? AND due_time <= ?")
        self._delete = p("DELETE FROM timers WHERE shard = ? AND minute = ? AND due_time = ? "
                         "AND tenant_id = ? AND task_id = ? AND kind = ?")
        self._select_cursor = p("SELECT minute FROM timer_cursors WHERE shard = ?")
        self._insert_cursor = p("INSERT INTO timer_cursors (shard, minute) VALUES (?, ?)")
        self._create_cursor = p(
            "INSERT INTO timer_cursors (shard, minute) VALUES (?, ?) IF NOT EXISTS")

    def add(self, timers: list[Timer]) -> None:
        futures = [self._session.execute_async(self._insert, (
            t.shard, minute_of(t.due_time), to_millis(t.due_time), t.tenant_id, t.task_id, t.kind))
            for t in timers]
        for future in futures:
            future.result()

    def due(self, shard: int, minute: datetime, *, until: datetime) -> list[Timer]:
        """Timers of one shard-minute due at or before ``until``, earliest first."""
        return [Timer(r.tenant_id, r.task_id, r.due_time.replace(tzinfo=UTC), r.kind)
                for r in self._session.execute(self._select, (shard, minute, until))]

    def delete(self, timer: Timer) -> None:
        self._session.execute(self._delete, (
            timer.shard, minute_of(timer.due_time), timer.due_time, timer.tenant_id,
            timer.task_id, timer.kind))

    def cursor(self, shard: int) -> datetime:
        """The first minute of the shard that may hold timers not yet fired.

        A keyspace's first reader starts the cursors at the current minute: timers are
        always written ahead of their due time, by services that run alongside a poller.
        """
        row = self._session.execute(self._select_cursor, (shard,)).one()
        if row is not None:
            return row.minute.replace(tzinfo=UTC)
        self._session.execute(self._create_cursor, (shard, minute_of(datetime.now(UTC))))
        return self._session.execute(self._select_cursor, (shard,)).one().minute.replace(
            tzinfo=UTC)

    def advance(self, shard: int, minute: datetime) -> None:
        self._session.execute(self._insert_cursor, (shard, minute))
