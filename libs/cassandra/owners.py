"""Partition owners: an epoch per Kafka partition, and the write timestamps it may use.

The owner of a partition takes the next epoch with one lightweight transaction when the
consumer group assigns the partition to it. The epoch comes with a range of write
timestamps, ``[range_start, range_end)`` in microseconds, that starts at or after the end of
every earlier epoch's range; the owner renews the range (``IF epoch = <its epoch>``) before its
clock reaches the end. So every write of a later epoch carries a larger timestamp than any
write of an earlier one: on every cell both wrote, a zombie owner's write loses, without a
Paxos round per task. A zombie cannot renew, so it stops once its clock passes its range.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cassandra.cluster import Session

# A range's length costs one LWT per partition per renewal; it also bounds how far ahead of
# the clock an owner's timestamps may run (a deletion writes above it: DELETE_AHEAD).
RANGE = timedelta(minutes=2)
RENEW_BEFORE = timedelta(seconds=45)  # renew once the clock is this close to the range end


class OwnershipLost(Exception):
    """Another owner took the partition: this one must stop writing for it."""


def now_micros() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Ownership:
    """One epoch of one partition, as its owner holds it."""

    topic: str
    partition: int
    epoch: int
    range_start: int  # microseconds
    range_end: int
    timer_minute: datetime | None


class TimestampRange:
    """Hands out strictly increasing write timestamps inside an epoch's range.

    A timestamp follows the wall clock (microseconds) so writes made with real time (a
    task's creation) order sensibly around it, never goes below a floor the caller gives (the
    task's creation time, whatever the clocks' skew) and never reaches the range's end: past
    it the owner must renew first (`TimestampRange.Exhausted`).
    """

    class Exhausted(Exception):
        """The range is used up: renew the epoch's range, or stop."""

    def __init__(self, ownership: Ownership, *, clock: Callable[[], int] = now_micros) -> None:
        self._start = ownership.range_start
        self._end = ownership.range_end
        self._last = ownership.range_start - 1
        self._clock = clock
        self._lock = threading.Lock()

    def extend(self, ownership: Ownership) -> None:
        with self._lock:
            self._end = max(self._end, ownership.range_end)

    @property
    def end(self) -> int:
        return self._end

    def next(self, floor: int = 0) -> int:
        with self._lock:
            stamp = max(self._clock(), self._last + 1, floor + 1, self._start)
            if stamp >= self._end:
                raise TimestampRange.Exhausted(f"timestamp {stamp} past the range end {self._end}")
            self._last = stamp
            return stamp

    def needs_renewal(self, *, ahead: timedelta = RENEW_BEFORE) -> bool:
        return self._clock() + ahead / timedelta(microseconds=1) >= self._end


class PartitionOwners:
    """The `partition_owners` table."""

    def __init__(self, session: Session, *, range_length: timedelta = RANGE) -> None:
        self._session = session
        self._length = int(range_length / timedelta(microseconds=1))
        p = session.prepare
        self._select = p("SELECT epoch, owner, range_start, range_end, timer_minute "
                         "FROM partition_owners WHERE topic = ? AND partition = ?")
        self._select_topic = p("SELECT partition, epoch FROM partition_owners WHERE topic = ?")
        # The first epoch starts the timer cursor: no timer of the partition is older.
        self._create = p("INSERT INTO partition_owners (topic, partition, epoch, owner, "
                         "range_start, range_end, timer_minute) VALUES (?, ?, 1, ?, ?, ?, ?) "
                         "IF NOT EXISTS")
        self._take = p("UPDATE partition_owners SET epoch = ?, owner = ?, range_start = ?, "
                       "range_end = ? WHERE topic = ? AND partition = ? IF epoch = ?")
        self._renew = p("UPDATE partition_owners SET range_end = ? "
                        "WHERE topic = ? AND partition = ? IF epoch = ?")
        self._timers = p("UPDATE partition_owners USING TIMESTAMP ? SET timer_minute = ? "
                         "WHERE topic = ? AND partition = ?")

    def acquire(self, topic: str, partition: int, owner: str, *, tries: int = 10) -> Ownership:
        """Takes the partition's next epoch (and a range past every earlier one)."""
        for _ in range(tries):
            row = self._session.execute(self._select, (topic, partition)).one()
            now = now_micros()
            if row is None:
                minute = datetime.fromtimestamp(now // 60_000_000 * 60, UTC)
                result = self._session.execute(self._create, (topic, partition, owner, now,
                                                              now + self._length, minute))
                if result.was_applied:
                    return Ownership(topic, partition, 1, now, now + self._length, minute)
                continue
            start = max(row.range_end, now)
            result = self._session.execute(self._take, (
                row.epoch + 1, owner, start, start + self._length, topic, partition, row.epoch))
            if result.was_applied:
                timer_minute = row.timer_minute.replace(tzinfo=UTC) if row.timer_minute else None
                return Ownership(topic, partition, row.epoch + 1, start, start + self._length,
                                 timer_minute)
        raise OwnershipLost(f"{topic}/{partition}: could not take an epoch in {tries} tries")

    def current(self, topic: str, partition: int) -> tuple[int, int] | None:
        """The current epoch's range (start, end), or None for a partition never owned."""
        row = self._session.execute(self._select, (topic, partition)).one()
        return (row.range_start, row.range_end) if row else None

    def renew(self, ownership: Ownership) -> Ownership:
        """Extends the range to a length from now.

        Raises:
            OwnershipLost: a later epoch exists.
        """
        end = max(ownership.range_end, now_micros() + self._length)
        result = self._session.execute(self._renew, (end, ownership.topic, ownership.partition,
                                                     ownership.epoch))
        if not result.was_applied:
            raise OwnershipLost(f"{ownership.topic}/{ownership.partition}: epoch "
                                f"{ownership.epoch} was taken over")
        return Ownership(ownership.topic, ownership.partition, ownership.epoch,
                         ownership.range_start, end, ownership.timer_minute)

    def epochs(self, topic: str) -> dict[int, int]:
        """Every partition's current epoch: an owner checks it still holds its own."""
        return {r.partition: r.epoch for r in self._session.execute(self._select_topic, (topic,))}

    def advance_timers(self, ownership: Ownership, minute: datetime, timestamp: int) -> None:
        """Records that every timer before ``minute`` fired (an owner's write, fenced by its
        timestamp like the others)."""
        self._session.execute(self._timers, (timestamp, minute, ownership.topic,
                                             ownership.partition))
