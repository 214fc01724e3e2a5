"""Firing timers: delayed starts, retries after backoff, expiries.

Every dispatcher polls every shard; the task row's compare-and-set decides which dispatcher's
firing takes effect, so no single instance is assumed and a dead one is not missed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.tasks import StoredTask, now_utc
from libs.cassandra.timers import MINUTE, SHARDS, Timer, TimerStore, minute_of, to_millis
from libs.lifecycle import Lifecycle
from libs.schedule import Schedule

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
Kind = records_pb2.TimerKind
CURSOR_REFRESH_SECONDS = 10.0
# A minute is passed over only this long after it ended: a timer written just before its due
# time by a slow write (at most the driver's timeout) still lands before the cursor moves.
WRITE_MARGIN = timedelta(seconds=15)


class TimerPoller:
    """Reads the timers due within ``lookahead`` and fires each when it is due.

    `poll` (called periodically) reads each shard from its cursor's minute to the lookahead
    into a `Schedule`, which fires each timer at its due time. A fired timer is deleted; a
    shard's cursor moves past a minute once that minute is well over and empty.
    """

    def __init__(self, *, timers: TimerStore, fire: Callable[[Timer], None],
                 lookahead: timedelta = timedelta(seconds=1), threads: int = 8) -> None:
        self._timers = timers
        self._cursors: dict[int, datetime] = {}
        self._cursors_read_at = -CURSOR_REFRESH_SECONDS
        self._fire = fire
        self._lookahead = lookahead
        self._known: set[Timer] = set()  # waiting in the schedule or firing
        self._lock = threading.Lock()
        self._schedule = Schedule(name="timer", threads=threads, clock=time.time)

    def start(self) -> TimerPoller:
        self._schedule.start()
        return self

    def stop(self) -> None:
        self._schedule.stop()

    def poll(self) -> int:
        """Reads the timers due soon into the schedule; returns how many were new."""
        now = now_utc()
        until = now + self._lookahead
        new = 0
        if time.monotonic() >= self._cursors_read_at + CURSOR_REFRESH_SECONDS:
            # Other dispatchers move the cursors too; an older one only costs a few reads.
            self._cursors = {shard: self._timers.cursor(shard) for shard in range(SHARDS)}
            self._cursors_read_at = time.monotonic()
        for shard in range(SHARDS):
            # Never past the current minute, whatever the stored cursor says: a cursor ahead
            # of time would skip timers due now.
            minute = min(self._cursors[shard], minute_of(now))
            contiguous_empty = True
            while minute <= minute_of(until):
                due = self._timers.due(shard, minute, until=until)
                new += sum(self._add(t) for t in due)
                if due or minute + MINUTE + WRITE_MARGIN > now:
                    contiguous_empty = False
                elif contiguous_empty:
                    self._timers.advance(shard, minute + MINUTE)
                    self._cursors[shard] = minute + MINUTE
                minute += MINUTE
        return new

    def _add(self, timer: Timer) -> bool:
        with self._lock:
            if timer in self._known:
                return False
            self._known.add(timer)
        self._schedule.at(timer.due_time.timestamp(), lambda: self._run(timer))
        return True

    def _run(self, timer: Timer) -> None:
        try:
            self._fire(timer)
            self._timers.delete(timer)
        except Exception:
            log.exception("a timer could not fire; it will be tried again", extra={
                "task_id": timer.task_id})
        finally:
            with self._lock:
                self._known.discard(timer)


class TimerFirer:
    """What a due timer does to its task."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def __call__(self, timer: Timer) -> None:
        stored = self._lifecycle.tasks.get(timer.tenant_id, timer.task_id)
        if timer.kind == Kind.TIMER_KIND_EXPIRE or (stored and _expired(stored)):
            self._lifecycle.end(stored, state=State.TASK_STATE_EXPIRED,
                                detail="its expire_time passed before it could start")
            return

        def still_due(current: StoredTask) -> bool:
            next_run = current.record.next_run_time.ToDatetime(tzinfo=UTC)
            return (current.state in (State.TASK_STATE_SCHEDULED, State.TASK_STATE_RETRY_WAIT)
                    and to_millis(next_run) == timer.due_time)

        self._lifecycle.queue(stored, detail="due", ready=still_due)


def _expired(stored: StoredTask) -> bool:
    task = stored.record.task
    return task.HasField("expire_time") and task.expire_time.ToDatetime(tzinfo=UTC) <= now_utc()
