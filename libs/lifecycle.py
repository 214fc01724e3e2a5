"""A task's state changes that several services make, each in its one crash-safe order.

Every change is a compare-and-set on the task row (fenced by the lease while an attempt
runs). What must not be lost is written *before* the state that depends on it: a retry's
timer before RETRY_WAIT, the unqueued-index entry before QUEUED. Final outcomes go to the
results topic, where the notifier wakes watchers and calls webhooks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from cassandra.cluster import Session
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.dead_letters import DeadLetterStore, dead_letter_of
from libs.cassandra.tasks import StoredTask, TaskStore, now_utc, timestamp_of
from libs.cassandra.timers import Timer, TimerStore, to_millis
from libs.kafka.client import Producer, Record
from libs.kafka.topics import results_topic
from libs.retry import RetryPolicy, decide
from libs.taskqueue import task_record_to_kafka

State = tasks_pb2.TaskState
Kind = records_pb2.TimerKind
# States a task waits in without an attempt: cancel and expiry end them directly.
WAITING_STATES = frozenset({State.TASK_STATE_ACCEPTED, State.TASK_STATE_QUEUED,
                            State.TASK_STATE_SCHEDULED, State.TASK_STATE_RETRY_WAIT})
CAS_TRIES = 5


class Lifecycle:
    def __init__(self, *, tasks: TaskStore, timers: TimerStore, dead_letters: DeadLetterStore,
                 producer: Producer, results_topic: str) -> None:
        self.tasks = tasks
        self._timers = timers
        self._dead_letters = dead_letters
        self._producer = producer
        self._results_topic = results_topic

    @classmethod
    def of_service(cls, session: Session, producer: Producer, *, service: str,
                   topic_prefix: str) -> Lifecycle:
        """The lifecycle of a service's process, with the stores on its session."""
        return cls(tasks=TaskStore(session, service=service), timers=TimerStore(session),
                   dead_letters=DeadLetterStore(session), producer=producer,
                   results_topic=results_topic(topic_prefix))

    # --- attempts (executor-manager, lease sweeper): fenced by the lease -------------------

    def end_attempt(self, record: records_pb2.TaskRecord, attempt: tasks_pb2.Attempt, *,
                    lease_id: uuid.UUID, policy: RetryPolicy, result: bytes = b"") -> int | None:
        """Records a finished attempt and what follows it: SUCCEEDED, RETRY_WAIT (with its
        timer), FAILED (into the dead letters) or EXPIRED. Returns the state, or None when the
        lease was lost and nothing was written (a zombie's late result)."""
        task = record.task
        task.attempts.append(attempt)
        task.attempt_count = len(task.attempts)
        task.last_status.CopyFrom(attempt.status)
        now = now_utc()
        if attempt.status.code == 0:
            task.result = result
            state, detail = State.TASK_STATE_SUCCEEDED, ""
        else:
            series = task.attempts[record.attempts_before_redrive:]
            decision = decide(
                policy, error_class=attempt.error_class, attempts=len(series), now=now,
                first_attempt_time=min(_started(a) for a in series),
                requested_delay=attempt.requested_retry_delay.ToTimedelta()
                if attempt.HasField("requested_retry_delay") else None,
                expire_time=task.expire_time.ToDatetime(tzinfo=UTC)
                if task.HasField("expire_time") else None)
            state = decision.state
            detail = f"{attempt.status.message} — {decision.detail}"
            if state == State.TASK_STATE_RETRY_WAIT:
                due = to_millis(now + decision.delay)
                record.next_run_time.CopyFrom(timestamp_of(due))
                self._timers.add([Timer(record.tenant_id, task.task_id, due, Kind.TIMER_KIND_RUN)])
        # A dead letter is filed before the task shows FAILED, so whoever sees FAILED finds
        # it; if the lease turns out lost, it is taken back.
        failed_at = attempt.end_time.ToDatetime(tzinfo=UTC)
        if state == State.TASK_STATE_FAILED:
            self._dead_letters.put(record, when=failed_at)
        if not self.tasks.finish(record, state=state, lease_id=lease_id, detail=detail):
            if state == State.TASK_STATE_FAILED:
                self._dead_letters.remove(dead_letter_of(record, when=failed_at),
                                          record.tenant_id)
            return None
        self.publish(record, state=state, attempt=attempt, lease_id=str(lease_id))
        return state

    # --- waiting tasks: compare-and-set on the state read ----------------------------------

    def queue(self, stored: StoredTask | None, *, detail: str,
              ready: Callable[[StoredTask], bool],
              amend: Callable[[records_pb2.TaskRecord], None] = lambda r: None) -> bool:
        """Moves a task that is ``ready`` (e.g. due, or dead-lettered) to QUEUED and onto its
        Kafka topic; False when it is not (any more). ``amend`` may change the record first
        (e.g. a re-drive's payload). Retried against concurrent changes."""
        for _ in range(CAS_TRIES):
            if stored is None or not ready(stored):
                return False
            record = stored.record
            amend(record)
            self.tasks.list_unqueued(record)  # first: a crash after the change loses nothing
            record.ClearField("next_run_time")
            if self.tasks.transition(stored, state=State.TASK_STATE_QUEUED, detail=detail):
                queued_time = now_utc()
                self._producer.send_all([task_record_to_kafka(
                    record, attempt_number=record.task.attempt_count + 1)])
                self.tasks.mark_queued([record], queued_time=queued_time, record_stage=False)
                return True
            stored = self.tasks.get(record.tenant_id, record.task.task_id)
        raise RuntimeError(f"task {stored.record.task.task_id!r} kept changing")

    def end(self, stored: StoredTask | None, *, state: int, detail: str,
            allowed: frozenset[int] = WAITING_STATES,
            amend: Callable[[StoredTask], None] = lambda s: None) -> StoredTask | None:
        """Ends a task in ``state`` (CANCELLED, EXPIRED) if it is in one of ``allowed``.

        Returns the task as it is afterwards — ended, or unchanged because it was not in an
        allowed state (e.g. already final) — or None when it does not exist. ``amend`` may
        add to the task as read (e.g. the attempt it interrupts) before it is written.
        """
        for _ in range(CAS_TRIES):
            if stored is None or stored.state not in allowed:
                return stored
            amend(stored)
            if self.tasks.transition(stored, state=state, detail=detail):
                self.publish(stored.record, state=state)
                return stored
            stored = self.tasks.get(stored.record.tenant_id, stored.record.task.task_id)
        raise RuntimeError("the task kept changing")

    def publish(self, record: records_pb2.TaskRecord, *, state: int,
                attempt: tasks_pb2.Attempt | None = None, lease_id: str = "") -> None:
        """Puts the outcome on the results topic for watchers and webhooks."""
        outcome = records_pb2.AttemptOutcome(
            tenant_id=record.tenant_id, task_id=record.task.task_id,
            function=record.task.function, attempt=attempt, result=record.task.result,
            state=state, lease_id=lease_id, result_targets=record.task.result_targets)
        self._producer.send_all([Record(self._results_topic, outcome.SerializeToString(),
                                        key=record.task.task_id.encode())])


def _started(attempt: tasks_pb2.Attempt) -> datetime:
    """When an attempt began (a lost lease has no start: its end stands in)."""
    when = attempt.start_time if attempt.HasField("start_time") else attempt.end_time
    return when.ToDatetime(tzinfo=UTC)
