"""The indexes a partition's owner keeps beside its tasks, bucketed by minute with TTLs so
that no partition of them collects tombstones: timers, and attempts out at executors.

Both are written by the owner with its fenced timestamps and read by the next owner when it
takes the partition over (`docs/architecture.md`, "The task path").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cassandra.cluster import ResponseFuture, Session
from cassandra.query import BatchStatement, BatchType

MINUTE = timedelta(minutes=1)
TIMER_TTL = timedelta(days=1)  # past its due time: long enough for any owner to fire it
INFLIGHT_TTL = timedelta(hours=1)  # past its lease's minute


def minute_of(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


def to_millis(when: datetime) -> datetime:
    """``when`` at Cassandra's precision, so a time read back compares equal."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Timer:
    tenant_id: str
    task_id: str
    due_time: datetime  # at millisecond precision
    kind: int  # weir.storage.v1.TimerKind


@dataclass(frozen=True)
class InflightEntry:
    tenant_id: str
    task_id: str
    attempt_id: str


class PartitionIndex:
    """Timers and in-flight attempts of one topic's partitions."""

    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._add_timer = p(
            "INSERT INTO partition_timers (topic, partition, minute, due_time, tenant_id, task_id, "
            "kind) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?")
        self._timers = p(
            "SELECT due_time, tenant_id, task_id, kind FROM partition_timers "
            "WHERE topic = ? AND partition = ? AND minute = ?")
        self._add_inflight = p(
            "INSERT INTO inflight (topic, partition, minute, tenant_id, task_id, attempt_id) "
            "VALUES (?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?")
        self._inflight = p(
            "SELECT tenant_id, task_id, attempt_id FROM inflight "
            "WHERE topic = ? AND partition = ? AND minute = ?")

    def add_timers(self, topic: str, partition: int, timers: Iterable[Timer],
                   timestamp: int) -> list[ResponseFuture]:
        """Writes timers, one single-partition batch per minute bucket."""
        by_minute: dict[datetime, list[Timer]] = {}
        for timer in timers:
            by_minute.setdefault(minute_of(timer.due_time), []).append(timer)
        futures = []
        for minute, group in by_minute.items():
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for t in group:
                ttl = int((t.due_time - datetime.now(UTC) + TIMER_TTL).total_seconds())
                batch.add(self._add_timer, (topic, partition, minute, t.due_time, t.tenant_id,
                                            t.task_id, t.kind, max(ttl, 60), timestamp))
            futures.append(self._session.execute_async(batch))
        return futures

    def timers(self, topic: str, partition: int, minute: datetime) -> list[Timer]:
        """One minute's timers of a partition, earliest first."""
        return [Timer(r.tenant_id, r.task_id, r.due_time.replace(tzinfo=UTC), r.kind)
                for r in self._session.execute(self._timers, (topic, partition, minute))]

    def add_inflight(self, topic: str, partition: int, minute: datetime,
                     entries: Iterable[InflightEntry], timestamp: int) -> ResponseFuture:
        """Lists attempts whose lease ends within ``minute`` (one single-partition batch)."""
        ttl = int((minute + MINUTE - datetime.now(UTC) + INFLIGHT_TTL).total_seconds())
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for e in entries:
            batch.add(self._add_inflight, (topic, partition, minute, e.tenant_id, e.task_id,
                                           e.attempt_id, max(ttl, 60), timestamp))
        return self._session.execute_async(batch)

    def inflight(self, topic: str, partition: int, minute: datetime) -> list[InflightEntry]:
        return [InflightEntry(r.tenant_id, r.task_id, r.attempt_id)
                for r in self._session.execute(self._inflight, (topic, partition, minute))]
