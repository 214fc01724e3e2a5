"""Tasks in Cassandra, one partition each (`task_state`): spec, state and history.

The gateway writes a task once (its spec, state QUEUED or SCHEDULED, the first stages);
from then on only the owner of the task's Kafka partition writes it, each change one INSERT
that sets the statics (state, status, result) and adds one history row, with a write
timestamp from the owner's epoch range (`libs.cassandra.owners`). So no write of a task is
a compare-and-set: the single writer and the timestamps order them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cassandra.cluster import ResponseFuture, Session
from google.protobuf.timestamp_pb2 import Timestamp
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

State = tasks_pb2.TaskState
FINAL_STATES = frozenset({State.TASK_STATE_SUCCEEDED, State.TASK_STATE_FAILED,
                          State.TASK_STATE_CANCELLED, State.TASK_STATE_EXPIRED})
# A deletion must win over every write of any owner: their ranges end at most a range length
# (and some clock skew) past now.
DELETE_AHEAD = timedelta(hours=1)


def now_utc() -> datetime:
    return datetime.now(UTC)


def timestamp_of(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def micros(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


@dataclass(frozen=True)
class TaskKey:
    tenant_id: str
    task_id: str


@dataclass
class StoredTask:
    """A task as stored: its spec, state and status, result, and history rows."""

    spec: records_pb2.TaskSpec
    state: tasks_pb2.TaskState
    status: records_pb2.TaskStatus
    result: bytes = b""
    payload_override: bytes | None = None
    history: list[records_pb2.TaskHistory] = field(default_factory=list)

    @property
    def key(self) -> TaskKey:
        return TaskKey(self.spec.tenant_id, self.spec.task.task_id)

    @property
    def payload(self) -> bytes:
        """The payload its next attempt runs with (a re-drive's replacement, if any)."""
        return self.spec.task.payload if self.payload_override is None else \
            self.payload_override

    def attempts(self) -> list[tasks_pb2.Attempt]:
        """Every attempt, oldest first; a later row's copy of an attempt replaces an earlier."""
        latest: dict[int, tasks_pb2.Attempt] = {}
        for row in self.history:
            for attempt in row.attempts:
                latest[attempt.attempt_number] = attempt
        return [latest[n] for n in sorted(latest)]

    def stages(self) -> list[tasks_pb2.TaskStage]:
        """The timeline, oldest first: each state of each attempt once (an owner that lost
        its partition mid-write may have stored a stage its successor stored again)."""
        seen: dict[tuple[int, int], tasks_pb2.TaskStage] = {}
        for row in self.history:
            for stage in row.stages:
                seen.setdefault((stage.state, stage.attempt_number), stage)
        return sorted(seen.values(), key=lambda s: (s.time.seconds, s.time.nanos))

    def to_task(self, *, full: bool) -> tasks_pb2.Task:
        """The task as the API shows it; ``full`` adds payload, result, attempts, stages."""
        task = tasks_pb2.Task()
        task.CopyFrom(self.spec.task)
        task.state = self.state
        status = self.status
        if status.HasField("update_time"):
            task.update_time.CopyFrom(status.update_time)
        task.attempt_count = status.attempt_count
        if status.HasField("last_status"):
            task.last_status.CopyFrom(status.last_status)
        if full:
            task.payload = self.payload
            task.result = self.result
            task.attempts.extend(self.attempts())
            task.stages.extend(self.stages())
        else:
            task.ClearField("payload")
        return task


@dataclass
class TaskWrite:
    """One owner write of a task: its statics and one history row, at ``timestamp``."""

    key: TaskKey
    state: int
    status: records_pb2.TaskStatus
    history: records_pb2.TaskHistory
    timestamp: int  # microseconds, from the owner's range
    result: bytes | None = None
    payload_override: bytes | None = None


class TaskStateStore:
    """Reads and writes `task_state`. Writes return futures: callers batch them."""

    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._create = p(
            "INSERT INTO task_state (tenant_id, task_id, seq, spec, state, status, history) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")
        base = "INSERT INTO task_state (tenant_id, task_id, seq, state, status, history"
        self._write = p(f"{base}) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")
        self._write_result = p(f"{base}, result) VALUES (?, ?, ?, ?, ?, ?, ?) "
                               "USING TIMESTAMP ?")
        self._write_override = p(f"{base}, payload_override) VALUES (?, ?, ?, ?, ?, ?, ?) "
                                 "USING TIMESTAMP ?")
        columns = "SELECT seq, spec, state, status, result, payload_override, history " \
                  "FROM task_state WHERE tenant_id = ? AND task_id = ?"
        self._select = p(columns)
        self._select_head = p(columns + " LIMIT 1")
        self._delete = p("DELETE FROM task_state USING TIMESTAMP ? "
                         "WHERE tenant_id = ? AND task_id = ?")
        self._exists = p("SELECT state FROM task_state WHERE tenant_id = ? AND task_id = ? "
                         "LIMIT 1")

    # --- writing ---------------------------------------------------------------------------

    def create(self, spec: records_pb2.TaskSpec, *, state: int,
               stages: Sequence[tasks_pb2.TaskStage]) -> ResponseFuture:
        """Stores a new task (QUEUED or SCHEDULED) at its creation time, with its first
        stages."""
        created = micros(spec.task.create_time.ToDatetime(tzinfo=UTC))
        status = records_pb2.TaskStatus(update_time=spec.task.create_time)
        history = records_pb2.TaskHistory(stages=stages)
        return self._session.execute_async(self._create, (
            spec.tenant_id, spec.task.task_id, created, spec.SerializeToString(), state,
            status.SerializeToString(), history.SerializeToString(), created))

    def write(self, change: TaskWrite) -> ResponseFuture:
        """The owner's write of one task (statics and a history row)."""
        values = [change.key.tenant_id, change.key.task_id, change.timestamp, change.state,
                  change.status.SerializeToString(), change.history.SerializeToString()]
        statement = self._write
        if change.result is not None:
            statement = self._write_result
            values.append(change.result)
        elif change.payload_override is not None:
            statement = self._write_override
            values.append(change.payload_override)
        return self._session.execute_async(statement, (*values, change.timestamp))

    def delete(self, key: TaskKey) -> None:
        """Deletes a task for good, above every owner's write timestamps (DELETE_AHEAD)."""
        self._session.execute(self._delete, (micros(now_utc() + DELETE_AHEAD), key.tenant_id,
                                             key.task_id))

    # --- reading ---------------------------------------------------------------------------

    def exists(self, key: TaskKey) -> bool:
        """Whether the task is stored (a zombie's lone history row does not count)."""
        row = self._session.execute(self._exists, (key.tenant_id, key.task_id)).one()
        return row is not None and row.state is not None

    def get(self, key: TaskKey) -> StoredTask | None:
        """The whole task, history included."""
        return self._stored(list(self._session.execute(self._select,
                                                       (key.tenant_id, key.task_id))))

    def get_many(self, keys: Iterable[TaskKey], *, history: bool = True
                 ) -> list[StoredTask | None]:
        """Tasks by key, read concurrently; without ``history`` only the statics (and the
        first row) are read."""
        statement = self._select if history else self._select_head
        futures = [self._session.execute_async(statement, (k.tenant_id, k.task_id))
                   for k in keys]
        return [self._stored(list(f.result())) for f in futures]

    def read_async(self, key: TaskKey) -> ResponseFuture:
        """A whole task, for an owner deciding what a record asks (`stored_of`)."""
        return self._session.execute_async(self._select, (key.tenant_id, key.task_id))

    @classmethod
    def stored_of(cls, rows: Sequence) -> StoredTask | None:
        return cls._stored(list(rows))

    @staticmethod
    def _stored(rows: list) -> StoredTask | None:
        if not rows or rows[0].spec is None:
            return None  # never created, or deleted (a lone history row of a zombie)
        head = rows[0]
        return StoredTask(
            spec=records_pb2.TaskSpec.FromString(head.spec), state=head.state,
            status=records_pb2.TaskStatus.FromString(head.status or b""),
            result=head.result or b"", payload_override=head.payload_override,
            history=[records_pb2.TaskHistory.FromString(r.history) for r in rows
                     if r.history])
