"""Acting on existing tasks: cancel, delete, re-drive from the dead letters, release parked."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import grpc
from google.rpc import code_pb2, status_pb2
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import dead_letters_pb2, tasks_pb2

from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.parked import ParkedStore
from libs.cassandra.tasks import FINAL_STATES, StoredTask, TaskKey, now_utc, timestamp_of
from libs.errors import DeadlineExceeded
from libs.grpcserver import current_call
from libs.kafka.client import Producer
from libs.lifecycle import WAITING_STATES, Lifecycle
from libs.taskqueue import task_record_to_kafka
from services.gateway.filters import TaskFilter

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
LEASED_STATES = frozenset({State.TASK_STATE_DISPATCHED, State.TASK_STATE_RUNNING})
LIST_DAYS = 31  # how far back listings and batch operations look


@dataclass(frozen=True)
class ScanPosition:
    """Where a newest-first scan of a tenant's tasks stands: the day-partition, and the last
    (creation time, task ID) listed (no task ID: nothing listed at that time yet)."""

    day: date
    before: datetime
    after_task_id: str = ""

    @classmethod
    def start(cls, before: datetime | None = None) -> ScanPosition:
        before = before or datetime.max.replace(tzinfo=UTC)
        return cls(min(before.date(), now_utc().date()), before)

    def to_dict(self) -> dict[str, str]:
        return {"day": self.day.isoformat(), "before": self.before.isoformat(),
                "after": self.after_task_id}

    @classmethod
    def from_dict(cls, fields: dict[str, str]) -> ScanPosition:
        """Raises ValueError (or KeyError, TypeError) when ``fields`` is not `to_dict`'s."""
        before = datetime.fromisoformat(fields["before"])
        return cls(date.fromisoformat(fields["day"]), before.replace(tzinfo=before.tzinfo or UTC),
                   str(fields.get("after", "")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: str) -> ScanPosition:
        return cls.from_dict(json.loads(raw))


def scan_tasks(lifecycle: Lifecycle, tenant_id: str, task_filter: TaskFilter,
               position: ScanPosition, *, batch: int = 200, budget: int | None = None
               ) -> Iterator[tuple[ScanPosition, StoredTask | None]]:
    """The tenant's tasks matching the filter, newest first, each with the position after it.

    The scan covers the listing window (`LIST_DAYS`, never days ahead of today) and stops
    as soon as the call it serves is over (`current_call`). After ``budget`` tasks read it
    yields the position reached with None and stops, so one call's work stays bounded.
    """
    tasks = lifecycle.tasks
    call = current_call()
    today = now_utc().date()
    oldest = today - timedelta(days=LIST_DAYS)
    day, before, after = position.day, position.before, position.after_task_id
    if day > today:
        day, before, after = today, datetime.max.replace(tzinfo=UTC), ""
    examined = 0
    while day >= oldest:
        if not call.active():
            raise DeadlineExceeded("the caller stopped waiting for this listing")
        rows = tasks.list_page(tenant_id, day=day, before=before, after_task_id=after,
                               limit=batch)
        if not rows:
            day, before, after = day - timedelta(days=1), datetime.max.replace(tzinfo=UTC), ""
            continue
        found = tasks.get_many(TaskKey(tenant_id, task_id) for _, task_id in rows)
        for (create_time, task_id), item in zip(rows, found, strict=True):
            before, after = create_time.replace(tzinfo=UTC), task_id
            examined += 1
            if item is not None and task_filter.matches(item.record.task):
                yield ScanPosition(day, before, after), item
            elif budget is not None and examined >= budget:
                yield ScanPosition(day, before, after), None
                return


class TaskControl:
    """Cancels, deletes and re-drives tasks; releases a resumed function's parked tasks."""

    def __init__(self, *, lifecycle: Lifecycle, dead_letters: DeadLetterStore,
                 parked: ParkedStore, functions: FunctionStore, producer: Producer,
                 executor_for: Callable[[str], executor_manager_pb2_grpc.ExecutorServiceStub]
                 ) -> None:
        self.lifecycle = lifecycle
        self._lifecycle = lifecycle
        self._functions = functions
        self._tasks = lifecycle.tasks
        self._dead_letters = dead_letters
        self._parked = parked
        self._producer = producer
        self._executor_for = executor_for

    def cancel(self, stored: StoredTask, *, reason: str) -> tuple[StoredTask, bool]:
        """Ends the task CANCELLED unless it already finished; a running attempt is stopped.

        The cancel is one compare-and-set that also takes away the lease: from then on the
        executor's writes are fenced out (its result is rejected, nothing retries it), and
        CancelAttempt makes it stop the worker now rather than at its next lease renewal.
        Returns the task afterwards and whether this call cancelled it.
        """
        stopped_at: list[str] = []  # the executor of the attempt the cancel interrupts

        def interrupted_attempt(current: StoredTask) -> None:
            stopped_at.clear()
            if current.state not in LEASED_STATES:
                return
            task = current.record.task
            stopped_at.append(current.executor_address or "")
            task.attempts.append(tasks_pb2.Attempt(
                attempt_number=len(task.attempts) + 1, executor_id=stopped_at[0],
                end_time=timestamp_of(now_utc()),
                exit_reason=tasks_pb2.ExitReason.EXIT_REASON_CANCELLED,
                status=status_pb2.Status(code=code_pb2.CANCELLED, message=reason)))
            task.attempt_count = len(task.attempts)

        before = stored.state
        after = self._lifecycle.end(stored, state=State.TASK_STATE_CANCELLED, detail=reason,
                                    allowed=WAITING_STATES | LEASED_STATES,
                                    amend=interrupted_attempt)
        cancelled = (after is not None and after.state == State.TASK_STATE_CANCELLED
                     and before != State.TASK_STATE_CANCELLED)
        if cancelled and stopped_at and stopped_at[0]:
            self._stop_attempt(stopped_at[0], stored.record, reason)
        return after or stored, cancelled

    def _stop_attempt(self, address: str, record: records_pb2.TaskRecord, reason: str) -> None:
        try:
            self._executor_for(address).CancelAttempt(executor_manager_pb2.CancelAttemptRequest(
                tenant_id=record.tenant_id, task_id=record.task.task_id, reason=reason),
                timeout=2)
        except grpc.RpcError as error:
            # Its lease is gone: the executor stops the attempt at its next renewal anyway.
            log.warning("could not reach the executor to stop a cancelled attempt", extra={
                "executor": address, "task_id": record.task.task_id,
                "code": error.code().name})

    def delete(self, stored: StoredTask) -> bool:
        """Deletes a task (cancelled first if unfinished) with its dead letter, if any."""
        if stored.state not in FINAL_STATES:
            stored, _ = self.cancel(stored, reason="deleted")
        if stored.state == State.TASK_STATE_FAILED:
            letter = self._dead_letters.get(stored.record.tenant_id, stored.record.task.task_id)
            if letter is not None:
                self._dead_letters.remove(letter, stored.record.tenant_id)
        self._tasks.delete(stored.record)
        return True

    def redrive(self, tenant_id: str, letter: dead_letters_pb2.DeadLetter, *,
                payload_override: bytes | None) -> bool:
        """Runs a dead-lettered task again, as the next attempt of the same task; False when
        it is no longer FAILED (deleted, or re-driven meanwhile)."""

        def amend(record: records_pb2.TaskRecord) -> None:
            record.redrive_count += 1
            record.attempts_before_redrive = len(record.task.attempts)
            if payload_override is not None:
                record.task.payload = payload_override

        queued = self._lifecycle.queue(
            self._tasks.get(tenant_id, letter.task_id), detail="re-driven from the dead letters",
            ready=lambda s: s.state == State.TASK_STATE_FAILED, amend=amend)
        self._dead_letters.remove(letter, tenant_id)
        return queued

    def delete_function(self, tenant_id: str, function: str) -> None:
        """Deletes a function and the tasks it still holds parked (they were cancelled, or
        DeleteFunction found none unfinished)."""
        self._functions.delete(tenant_id, function)
        self._parked.forget_function(tenant_id, function)

    def release_parked(self, tenant_id: str, function: str) -> int:
        """Queues again every task a paused function held; returns how many."""
        released = 0
        batch: list[records_pb2.TaskMessage] = []
        for message in self._parked.parked(tenant_id, function):
            batch.append(message)
            if len(batch) == 500:
                released += self._release(batch)
                batch = []
        return released + self._release(batch)

    def _release(self, messages: list[records_pb2.TaskMessage]) -> int:
        keys = [TaskKey(m.tenant_id, m.task_id) for m in messages]
        found = self._tasks.get_many(keys)
        waiting = [(m, s) for m, s in zip(messages, found, strict=True)
                   if s is not None and s.state in (State.TASK_STATE_ACCEPTED,
                                                    State.TASK_STATE_QUEUED)]
        self._producer.send_all(task_record_to_kafka(s.record, attempt_number=m.attempt_number)
                                for m, s in waiting)
        for message in messages:
            self._parked.unpark(message)
        return len(waiting)
