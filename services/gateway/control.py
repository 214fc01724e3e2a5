"""Acting on existing tasks: cancel, delete, re-drive from the dead letters, release parked.

The gateway never writes an existing task: the owner of the task's Kafka partition is its
only writer. A change is asked for with a control record on that partition, which Kafka
orders with the task's own records, and the gateway reads the stored task to see it done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from kafka.errors import KafkaError
from weir.storage.v1 import records_pb2
from weir.v1 import dead_letters_pb2, tasks_pb2

from libs.cassandra.attempt_logs import AttemptLogStore
from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.dedup import DedupStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.listing import TaskListing
from libs.cassandra.parked import ParkedStore
from libs.cassandra.taskstate import (
    DELETE_AHEAD,
    FINAL_STATES,
    StoredTask,
    TaskKey,
    TaskStateStore,
    now_utc,
    timestamp_of,
)
from libs.errors import DeadlineExceeded, Unavailable
from libs.grpcserver import current_call
from libs.kafka.client import Producer
from libs.taskqueue import Routed, cancel_message, records_by_partition, redrive_message
from services.gateway.filters import TaskFilter

State = tasks_pb2.TaskState
LIST_DAYS = 31  # how far back listings and batch operations look
# How a cancel waits for the owner to end the task: polls of one task's statics, cheap.
CANCEL_POLL_SECONDS = 0.025
CANCEL_WAIT_SECONDS = 5.0
RELEASE_BATCH = 500


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


def scan_tasks(tasks: TaskStateStore, listing: TaskListing, tenant_id: str,
               task_filter: TaskFilter, position: ScanPosition, *, batch: int = 200,
               budget: int | None = None, history: bool = False
               ) -> Iterator[tuple[ScanPosition, StoredTask | None]]:
    """The tenant's tasks matching the filter, newest first, each with the position after it.

    The scan covers the listing window (`LIST_DAYS`, never days ahead of today) and stops
    as soon as the call it serves is over (`current_call`). After ``budget`` tasks read it
    yields the position reached with None and stops, so one call's work stays bounded.
    ``history`` reads the tasks' timelines and attempts too (a FULL view).
    """
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
        rows = listing.page(tenant_id, day=day, before=before, after_task_id=after,
                            limit=batch)
        if not rows:
            day, before, after = day - timedelta(days=1), datetime.max.replace(tzinfo=UTC), ""
            continue
        found = tasks.get_many((TaskKey(tenant_id, task_id) for _, task_id in rows),
                               history=history)
        for (create_time, task_id), item in zip(rows, found, strict=True):
            before, after = create_time, task_id
            examined += 1
            if item is not None and task_filter.matches(item.to_task(full=False)):
                yield ScanPosition(day, before, after), item
            elif budget is not None and examined >= budget:
                yield ScanPosition(day, before, after), None
                return


class TaskControl:
    """Cancels, deletes and re-drives tasks; releases a resumed function's parked tasks.

    Every change is a record to the task's owner: this class writes no task.
    """

    def __init__(self, *, tasks: TaskStateStore, listing: TaskListing,
                 dead_letters: DeadLetterStore, parked: ParkedStore, functions: FunctionStore,
                 dedup: DedupStore, producer: Producer,
                 cancel_wait_seconds: float = CANCEL_WAIT_SECONDS,
                 attempt_logs: AttemptLogStore | None = None) -> None:
        self.tasks = tasks
        self.attempt_logs = attempt_logs
        self._dedup = dedup
        self.listing = listing
        self._dead_letters = dead_letters
        self._parked = parked
        self._functions = functions
        self._producer = producer
        self._cancel_wait = cancel_wait_seconds

    def request_cancel(self, stored: StoredTask, *, reason: str) -> bool:
        """Asks the task's owner to cancel it, without waiting. A task already final is left
        alone: True when it is CANCELLED (a repeat is done), False otherwise."""
        if stored.state in FINAL_STATES:
            return stored.state == State.TASK_STATE_CANCELLED
        spec = stored.spec
        self._ask([(spec.topic, spec.partition, cancel_message(spec, reason=reason))])
        return True

    def cancel(self, stored: StoredTask, *, reason: str) -> StoredTask:
        """Cancels an unfinished task and waits (up to ``cancel_wait_seconds``) until its
        owner has ended it; returns the task as it is then (final or not, e.g. while its
        owner is being replaced). A running attempt is stopped by its owner."""
        if stored.state in FINAL_STATES:
            return stored
        self.request_cancel(stored, reason=reason)
        return self._await_final(stored)

    def _ask(self, routed: list[Routed]) -> None:
        """Produces control records to the owners of their partitions (acks=all).

        Raises:
            Unavailable: Kafka did not take them in time; asking again is safe.
        """
        try:
            self._producer.send_all(records_by_partition(routed))
        except KafkaError as exc:
            raise Unavailable(f"could not reach the task's owner through Kafka: {exc}") from exc

    def _await_final(self, stored: StoredTask) -> StoredTask:
        call = current_call()
        deadline = time.monotonic() + self._cancel_wait
        while stored.state not in FINAL_STATES and time.monotonic() < deadline \
                and call.active():
            time.sleep(CANCEL_POLL_SECONDS)
            [current] = self.tasks.get_many([stored.key], history=False)
            if current is None:
                break  # deleted meanwhile
            stored = current
        return stored

    def delete(self, stored: StoredTask) -> bool:
        """Deletes a task (cancelled first if unfinished), its dead letter, its attempt logs
        and its listing.

        The deletion's timestamps are above any owner's, so it stands even when the owner
        has not ended the task yet."""
        if stored.state not in FINAL_STATES:
            stored = self.cancel(stored, reason="deleted")
        tenant_id = stored.spec.tenant_id
        letter = self._dead_letters.get(tenant_id, stored.spec.task.task_id)
        if letter is not None:
            self._dead_letters.remove(letter, tenant_id)
        # The deletion stands above writes for DELETE_AHEAD: a task created again under
        # this ID meanwhile would be hidden by it, so the ID stays taken that long.
        self._dedup.hold(tenant_id, stored.spec.task.task_id, stored.spec.task.task_id,
                         at_least=DELETE_AHEAD)
        if self.attempt_logs is not None:
            self.attempt_logs.delete(tenant_id, stored.spec.task.task_id)
        self.tasks.delete(stored.key)
        self.listing.remove(stored.spec)
        return True

    def redrive(self, tenant_id: str, letter: dead_letters_pb2.DeadLetter, *,
                payload_override: bytes | None) -> bool:
        """Asks the owner to run a dead-lettered task again, as its next attempt, and drops
        the dead letter; False when the task is no longer FAILED (deleted, or re-driven)."""
        [stored] = self.tasks.get_many([TaskKey(tenant_id, letter.task_id)], history=False)
        if stored is None or stored.state != State.TASK_STATE_FAILED:
            self._dead_letters.remove(letter, tenant_id)  # a stale letter
            return False
        spec = stored.spec
        self._ask([(spec.topic, spec.partition,
                    redrive_message(stored, payload_override=payload_override))])
        self._dead_letters.remove(letter, tenant_id)
        return True

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
            if len(batch) == RELEASE_BATCH:
                released += self._release(batch)
                batch = []
        return released + self._release(batch)

    def _release(self, messages: Sequence[records_pb2.TaskMessage]) -> int:
        """Re-produces parked messages to their tasks' partitions, then unparks them. The
        owner checks each against the stored state (it may have been cancelled meanwhile)."""
        found = self.tasks.get_many((TaskKey(m.tenant_id, m.task_id) for m in messages),
                                    history=False)
        enqueued = timestamp_of(now_utc())
        routed: list[Routed] = []
        for message, stored in zip(messages, found, strict=True):
            if stored is None or stored.state in FINAL_STATES:
                continue
            message.check_state = True
            message.enqueue_time.CopyFrom(enqueued)
            routed.append((stored.spec.topic, stored.spec.partition, message))
        if routed:
            self._ask(routed)
        self._parked.unpark_many(messages)
        return len(routed)
