"""Tasks in Cassandra: rows, timeline events, the indexes the sweepers scan, and leases.

The `state` column is authoritative; the `record` blob (weir.storage.v1.TaskRecord) carries the
rest. Ownership of a running attempt is fenced with lightweight transactions on `lease_id`:
only the holder of the current lease can finish a task, so a zombie executor's late result is
rejected and a task succeeds at most once.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType
from google.protobuf.timestamp_pb2 import Timestamp
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

State = tasks_pb2.TaskState
FINAL_STATES = frozenset({State.TASK_STATE_SUCCEEDED, State.TASK_STATE_FAILED,
                          State.TASK_STATE_CANCELLED, State.TASK_STATE_EXPIRED})
# States from which a dispatcher may lease a task.
LEASABLE_STATES = (State.TASK_STATE_ACCEPTED, State.TASK_STATE_QUEUED)
BUCKETS = 16


def bucket_of(tenant_id: str, task_id: str) -> int:
    """The sweeper index partition of a task (stable across processes)."""
    return zlib.crc32(f"{tenant_id}/{task_id}".encode()) % BUCKETS


def now_utc() -> datetime:
    return datetime.now(UTC)


def timestamp_of(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def micros(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


@dataclass
class StoredTask:
    """A task as stored: its record (with `task.state` from the column) and its lease."""

    record: records_pb2.TaskRecord
    lease_id: uuid.UUID | None
    lease_expire_time: datetime | None
    update_time: datetime | None = None  # the column, as stored: compare-and-set compares it
    executor_address: str | None = None  # where the current attempt runs

    @property
    def state(self) -> int:
        return self.record.task.state


@dataclass(frozen=True)
class TaskKey:
    tenant_id: str
    task_id: str


class TaskStore:
    """Reads and writes tasks; every state change also appends to the task's timeline.

    Args:
        session: a session on Weir's keyspace.
        service: the name recorded in the timeline as the author of the changes.
    """

    def __init__(self, session: Session, *, service: str) -> None:
        self._session = session
        self._service = service
        p = session.prepare
        self._insert_task = p(
            "INSERT INTO tasks (tenant_id, task_id, function, state, create_time, update_time, "
            "record) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")
        self._insert_by_day = p(
            "INSERT INTO tasks_by_day (tenant_id, day, create_time, task_id, function) "
            "VALUES (?, ?, ?, ?, ?)")
        self._insert_event = p(
            "INSERT INTO task_events (tenant_id, task_id, event_id, state, service, event) "
            "VALUES (?, ?, ?, ?, ?, ?)")
        self._insert_unqueued = p(
            "INSERT INTO unqueued_tasks (bucket, tenant_id, task_id, create_time) "
            "VALUES (?, ?, ?, ?)")
        self._mark_queued = p(
            "UPDATE tasks USING TIMESTAMP ? SET state = ? WHERE tenant_id = ? AND task_id = ?")
        self._delete_unqueued = p(
            "DELETE FROM unqueued_tasks WHERE bucket = ? AND tenant_id = ? AND task_id = ?")
        self._select_task = p(
            "SELECT state, record, lease_id, lease_expire_time, update_time, executor_address "
            "FROM tasks WHERE tenant_id = ? AND task_id = ?")
        self._select_events = p(
            "SELECT event FROM task_events WHERE tenant_id = ? AND task_id = ?")
        self._lease = p(
            "UPDATE tasks SET state = ?, lease_id = ?, lease_expire_time = ?, update_time = ?, "
            "executor_address = ? WHERE tenant_id = ? AND task_id = ? IF state IN ?")
        self._insert_lease = p(
            "INSERT INTO leases (bucket, tenant_id, task_id, lease_id, expire_time) "
            "VALUES (?, ?, ?, ?, ?)")
        self._delete_lease = p(
            "DELETE FROM leases WHERE bucket = ? AND tenant_id = ? AND task_id = ? "
            "AND lease_id = ?")
        self._mark_running = p(
            "UPDATE tasks SET state = ?, update_time = ? WHERE tenant_id = ? AND task_id = ? "
            "IF lease_id = ?")
        self._renew = p(
            "UPDATE tasks SET lease_expire_time = ? WHERE tenant_id = ? AND task_id = ? "
            "IF lease_id = ?")
        self._finish = p(
            "UPDATE tasks SET state = ?, record = ?, lease_id = null, lease_expire_time = null, "
            "executor_address = null, update_time = ? WHERE tenant_id = ? AND task_id = ? "
            "IF lease_id = ?")
        self._transition = p(
            "UPDATE tasks SET state = ?, record = ?, lease_id = null, lease_expire_time = null, "
            "executor_address = null, update_time = ? WHERE tenant_id = ? AND task_id = ? "
            "IF state = ? AND update_time = ?")
        self._delete_task = p("DELETE FROM tasks WHERE tenant_id = ? AND task_id = ?")
        self._delete_events = p("DELETE FROM task_events WHERE tenant_id = ? AND task_id = ?")
        self._delete_by_day = p(
            "DELETE FROM tasks_by_day WHERE tenant_id = ? AND day = ? AND create_time = ? "
            "AND task_id = ?")
        self._select_leases = p(
            "SELECT tenant_id, task_id, lease_id, expire_time FROM leases WHERE bucket = ?")
        self._select_unqueued = p(
            "SELECT tenant_id, task_id, create_time FROM unqueued_tasks WHERE bucket = ?")
        listing = "SELECT create_time, task_id FROM tasks_by_day WHERE tenant_id = ? AND day = ? "
        self._select_by_day = p(listing + "AND create_time < ? LIMIT ?")
        self._select_by_day_from = p(listing + "AND create_time <= ? LIMIT ?")
        self._select_by_day_same_time = p(listing + "AND create_time = ? AND task_id > ? LIMIT ?")

    # --- creation and queueing (gateway) -------------------------------------------------

    def create(self, records: Sequence[records_pb2.TaskRecord]) -> None:
        """Stores new tasks in their state: ACCEPTED (listed as unqueued until `mark_queued`)
        or SCHEDULED (its timer already written by the caller); raises on failure.

        Per task, the small index rows go first in one logged batch, then the row with the
        payload on its own (a logged batch is capped far below a 1 MiB payload). A crash in
        between leaves index entries without a task, which readers skip and the sweeper
        drops: the task was never acknowledged. Tasks are written concurrently.
        """
        indexed = []
        for record in records:
            task = record.task
            created = task.create_time.ToDatetime(tzinfo=UTC)
            batch = BatchStatement(batch_type=BatchType.LOGGED)
            batch.add(self._insert_by_day, (record.tenant_id, created.date(), created,
                                            task.task_id, task.function))
            if task.state == State.TASK_STATE_ACCEPTED:
                batch.add(self._insert_unqueued, (bucket_of(record.tenant_id, task.task_id),
                                                  record.tenant_id, task.task_id, created))
            batch.add(self._event_statement(record.tenant_id, task.task_id, tasks_pb2.TaskStage(
                state=task.state, time=task.create_time, service=self._service)))
            indexed.append(self._session.execute_async(batch))
        for future in indexed:
            future.result()
        rows = []
        for record in records:
            task = record.task
            created = task.create_time.ToDatetime(tzinfo=UTC)
            rows.append(self._session.execute_async(self._insert_task, (
                record.tenant_id, task.task_id, task.function, task.state,
                created, created, record.SerializeToString(), micros(created))))
        for future in rows:
            future.result()

    def mark_queued(self, records: Sequence[records_pb2.TaskRecord], *,
                    queued_time: datetime, record_stage: bool = True) -> None:
        """Records that the tasks are on Kafka and drops them from the unqueued index.

        ``queued_time`` is when producing began, so the QUEUED stage sorts before any
        DISPATCHED stage a fast dispatcher may already have written. For the same reason the
        state write carries the creation time + 1µs as its write timestamp: it can never
        overwrite a later state.
        """
        futures = []
        for record in records:
            tenant, task_id = record.tenant_id, record.task.task_id
            created = record.task.create_time.ToDatetime(tzinfo=UTC)
            futures += [
                self._session.execute_async(self._mark_queued, (
                    micros(created) + 1, State.TASK_STATE_QUEUED, tenant, task_id)),
                self._session.execute_async(self._delete_unqueued, (
                    bucket_of(tenant, task_id), tenant, task_id)),
            ]
            if record_stage:
                futures.append(self._session.execute_async(self._event_statement(
                    tenant, task_id, tasks_pb2.TaskStage(
                        state=State.TASK_STATE_QUEUED, time=timestamp_of(queued_time),
                        service=self._service))))
        for future in futures:
            future.result()

    def unqueued(self, bucket: int, *, older_than: datetime) -> list[TaskKey]:
        """Tasks of one index bucket stored before ``older_than`` and not confirmed queued."""
        rows = self._session.execute(self._select_unqueued, (bucket,))
        return [TaskKey(r.tenant_id, r.task_id) for r in rows
                if r.create_time.replace(tzinfo=UTC) < older_than]

    def forget_unqueued(self, key: TaskKey) -> None:
        """Drops an index entry whose task row was never written (a create that failed)."""
        self._session.execute(self._delete_unqueued, (bucket_of(key.tenant_id, key.task_id),
                                                      key.tenant_id, key.task_id))

    # --- reading ---------------------------------------------------------------------------

    def get(self, tenant_id: str, task_id: str) -> StoredTask | None:
        row = self._session.execute(self._select_task, (tenant_id, task_id)).one()
        return self._stored(row)

    def get_many(self, keys: Iterable[TaskKey]) -> list[StoredTask | None]:
        futures = [self._session.execute_async(self._select_task, (k.tenant_id, k.task_id))
                   for k in keys]
        return [self._stored(f.result().one()) for f in futures]

    def stages(self, tenant_id: str, task_id: str) -> list[tasks_pb2.TaskStage]:
        """The task's timeline, oldest first (by the stages' own times: services write them
        concurrently, so the order of arrival is not the order of events)."""
        rows = self._session.execute(self._select_events, (tenant_id, task_id))
        stages = [records_pb2.TaskEvent.FromString(r.event).stage for r in rows]
        return sorted(stages, key=lambda s: (s.time.seconds, s.time.nanos))

    def list_page(self, tenant_id: str, *, day, before: datetime, after_task_id: str,
                  limit: int) -> list[tuple]:
        """(create_time, task_id) of one day-partition, newest first, from the position
        (``before``, ``after_task_id``) on: rows listed after it, i.e. created at ``before`` with
        a larger task ID (a batch's tasks share one creation time), then created earlier.
        Without ``after_task_id``, from ``before`` itself on."""
        if not after_task_id:
            rows = list(self._session.execute(self._select_by_day_from,
                                              (tenant_id, day, before, limit)))
        else:
            rows = list(self._session.execute(self._select_by_day_same_time,
                                              (tenant_id, day, before, after_task_id, limit)))
            if len(rows) < limit:
                rows += self._session.execute(self._select_by_day,
                                              (tenant_id, day, before, limit - len(rows)))
        return [(r.create_time, r.task_id) for r in rows]

    # --- leases (dispatcher, executor-manager) ---------------------------------------------

    def lease(self, tenant_id: str, task_id: str, *, lease_id: uuid.UUID,
              expire_time: datetime, attempt_number: int, executor_address: str = "") -> bool:
        """Takes a queued task for one attempt; False when it is not leasable (any more).

        The sweeper's index entry is written first: a crash right after the lease is taken
        must not leave a leased task that no sweeper can find.
        """
        bucket = bucket_of(tenant_id, task_id)
        self._session.execute(self._insert_lease, (bucket, tenant_id, task_id, lease_id,
                                                   expire_time))
        now = now_utc()
        applied = self._session.execute(self._lease, (
            State.TASK_STATE_DISPATCHED, lease_id, expire_time, now, executor_address or None,
            tenant_id, task_id, list(LEASABLE_STATES))).was_applied
        if not applied:
            self._session.execute(self._delete_lease, (bucket, tenant_id, task_id, lease_id))
            return False
        self.append_stage(tenant_id, task_id, tasks_pb2.TaskStage(
            state=State.TASK_STATE_DISPATCHED, time=timestamp_of(now), service=self._service,
            attempt_number=attempt_number))
        return True

    def mark_running(self, tenant_id: str, task_id: str, *, lease_id: uuid.UUID,
                     attempt_number: int, start_time: datetime) -> bool:
        applied = self._session.execute(self._mark_running, (
            State.TASK_STATE_RUNNING, start_time, tenant_id, task_id, lease_id)).was_applied
        if applied:
            self.append_stage(tenant_id, task_id, tasks_pb2.TaskStage(
                state=State.TASK_STATE_RUNNING, time=timestamp_of(start_time),
                service=self._service, attempt_number=attempt_number))
        return applied

    def renew(self, tenant_id: str, task_id: str, *, lease_id: uuid.UUID,
              expire_time: datetime) -> bool:
        """Extends a lease; False when it was lost (the attempt must stop)."""
        applied = self._session.execute(self._renew, (
            expire_time, tenant_id, task_id, lease_id)).was_applied
        if applied:
            self._session.execute(self._insert_lease, (
                bucket_of(tenant_id, task_id), tenant_id, task_id, lease_id, expire_time))
        return applied

    def finish(self, record: records_pb2.TaskRecord, *, state: int, lease_id: uuid.UUID,
               detail: str = "") -> bool:
        """Ends the attempt with ``state`` if ``lease_id`` still holds the task (fencing).

        Returns False, writing nothing, when the lease was lost: a late result is rejected.
        """
        tenant_id, task_id = record.tenant_id, record.task.task_id
        now = now_utc()
        record.task.state = state
        record.task.update_time.CopyFrom(timestamp_of(now))
        applied = self._session.execute(self._finish, (
            state, record.SerializeToString(), now, tenant_id, task_id, lease_id)).was_applied
        if applied:
            self._session.execute(self._delete_lease, (bucket_of(tenant_id, task_id), tenant_id,
                                                       task_id, lease_id))
            self.append_stage(tenant_id, task_id, tasks_pb2.TaskStage(
                state=state, time=timestamp_of(now), service=self._service,
                attempt_number=record.task.attempt_count, detail=detail))
        return applied

    def transition(self, stored: StoredTask, *, state: int, detail: str = "",
                   attempt_number: int | None = None) -> bool:
        """Moves a task that holds no lease from the state it was read in to ``state``,
        storing ``stored.record`` with it (compare-and-set on the state and update time read).

        False, writing nothing, when the task changed since it was read: the caller reads it
        again and decides anew. Any lease is cleared (a cancelled running task's executor is
        fenced out by it).
        """
        record = stored.record
        tenant_id, task_id = record.tenant_id, record.task.task_id
        read_state = record.task.state
        now = now_utc()
        record.task.state = state
        record.task.update_time.CopyFrom(timestamp_of(now))
        applied = self._session.execute(self._transition, (
            state, record.SerializeToString(), now, tenant_id, task_id, read_state,
            stored.update_time)).was_applied
        if not applied:
            record.task.state = read_state
            return False
        if stored.lease_id is not None:
            self._session.execute(self._delete_lease, (bucket_of(tenant_id, task_id), tenant_id,
                                                       task_id, stored.lease_id))
        self.append_stage(tenant_id, task_id, tasks_pb2.TaskStage(
            state=state, time=timestamp_of(now), service=self._service, detail=detail,
            attempt_number=record.task.attempt_count if attempt_number is None
            else attempt_number))
        return True

    def list_unqueued(self, record: records_pb2.TaskRecord) -> None:
        """Lists a task as not yet confirmed on Kafka, before it is moved to QUEUED: a crash
        before `mark_queued` then leaves it for the sweeper instead of losing it."""
        tenant_id, task_id = record.tenant_id, record.task.task_id
        self._session.execute(self._insert_unqueued, (bucket_of(tenant_id, task_id), tenant_id,
                                                      task_id, now_utc()))

    def delete(self, record: records_pb2.TaskRecord) -> None:
        """Deletes a task, its timeline and its listing (its dedup claim stays)."""
        tenant_id, task = record.tenant_id, record.task
        created = task.create_time.ToDatetime(tzinfo=UTC)
        futures = [self._session.execute_async(statement, values) for statement, values in (
            (self._delete_by_day, (tenant_id, created.date(), created, task.task_id)),
            (self._delete_events, (tenant_id, task.task_id)),
            (self._delete_task, (tenant_id, task.task_id)))]
        for future in futures:
            future.result()

    def forget_lease(self, key: TaskKey, lease_id: uuid.UUID) -> None:
        """Drops an index entry of a lease the task does not hold (taken over or never won)."""
        self._session.execute(self._delete_lease, (bucket_of(key.tenant_id, key.task_id),
                                                   key.tenant_id, key.task_id, lease_id))

    def expired_leases(self, bucket: int, *, now: datetime) -> list[tuple[TaskKey, uuid.UUID]]:
        rows = self._session.execute(self._select_leases, (bucket,))
        return [(TaskKey(r.tenant_id, r.task_id), r.lease_id) for r in rows
                if r.expire_time.replace(tzinfo=UTC) < now]

    # --- timeline --------------------------------------------------------------------------

    def append_stage(self, tenant_id: str, task_id: str, stage: tasks_pb2.TaskStage) -> None:
        self._session.execute(self._event_statement(tenant_id, task_id, stage))

    def _event_statement(self, tenant_id: str, task_id: str, stage: tasks_pb2.TaskStage):
        event = records_pb2.TaskEvent(tenant_id=tenant_id, task_id=task_id, stage=stage)
        return self._insert_event.bind((tenant_id, task_id, uuid.uuid1(), stage.state,
                                        stage.service, event.SerializeToString()))

    @staticmethod
    def _stored(row) -> StoredTask | None:
        if row is None or row.record is None:
            return None
        record = records_pb2.TaskRecord.FromString(row.record)
        record.task.state = row.state
        expire = row.lease_expire_time.replace(tzinfo=UTC) if row.lease_expire_time else None
        return StoredTask(record, row.lease_id, expire, row.update_time, row.executor_address)
