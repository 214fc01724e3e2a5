"""The dispatcher's intake on real Cassandra: a record that comes again after a rewind is
checked against the task's stored state, so a task that finished in between never runs again."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.functions import FunctionStore
from libs.cassandra.owners import Ownership
from libs.cassandra.taskstate import TaskKey, TaskStateStore, TaskWrite, timestamp_of
from services.dispatcher.engine import Functions, Intake
from services.dispatcher.owner import Owner
from tests.helpers import eventually, unique

State = tasks_pb2.TaskState


@dataclass
class Delivery:
    """A consumed record, as the intake sees one (kafka-python's own needs a live consumer)."""

    topic: str
    partition: int
    offset: int
    value: bytes
    outcomes: list[str] = field(default_factory=list)

    def ack(self) -> None:
        self.outcomes.append("ack")

    def nack(self) -> None:
        self.outcomes.append("nack")


@dataclass
class OwnedTask:
    """One stored task on a partition an owner has adopted, and the intake in front of it."""

    tasks: TaskStateStore
    key: TaskKey
    spec: records_pb2.TaskSpec
    owner: Owner
    intake: Intake
    start: int  # the owner's first write timestamp


def owned_task(cassandra, *, state: int, schedule: timedelta | None = None) -> OwnedTask:
    tasks = TaskStateStore(cassandra)
    topic, key = unique("topic"), TaskKey(unique("tenant"), "t1")
    now = datetime.now(UTC)
    spec = records_pb2.TaskSpec(tenant_id=key.tenant_id, topic=topic, partition=0)
    spec.task.task_id, spec.task.function = key.task_id, "echo"
    spec.task.create_time.CopyFrom(timestamp_of(now))
    if schedule is not None:
        spec.task.schedule_time.CopyFrom(timestamp_of(now + schedule))
    tasks.create(spec, state=state, stages=[]).result()
    owner = Owner(lease=timedelta(seconds=30), dispatcher_id="d1")
    start = int(now.timestamp() * 1e6)
    owner.own(Ownership(topic, 0, epoch=1, range_start=start, range_end=start + 60_000_000,
                        timer_minute=None), replay_below=0)
    owner.adopted((topic, 0))
    intake = Intake(owner=owner, tasks=tasks, functions=Functions(FunctionStore(cassandra)))
    return OwnedTask(tasks, key, spec, owner, intake, start)


def test_a_record_delivered_again_after_a_rewind_does_not_run_a_finished_task_again(
        cassandra):
    it = owned_task(cassandra, state=State.TASK_STATE_QUEUED)
    tasks, key, spec, owner, intake = it.tasks, it.key, it.spec, it.owner, it.intake
    topic, start = spec.topic, it.start
    message = records_pb2.TaskMessage(tenant_id=key.tenant_id, task_id=key.task_id,
                                      function="echo", create_time=spec.task.create_time)
    value = records_pb2.TaskMessageBatch(tasks=[message]).SerializeToString()

    first = Delivery(topic, 0, 7, value)
    intake.offer(first)  # new: taken without a read (its function is unknown: it fails)
    eventually(lambda: owner.has_changes(), timeout=10)
    owner.flushed(owner.collect())
    assert first.outcomes == ["ack"] and owner.stats()["held"] == 0
    # Meanwhile it was re-driven and succeeded (any final state written by its owner would do).
    tasks.write(TaskWrite(key=key, state=State.TASK_STATE_SUCCEEDED,
                          status=records_pb2.TaskStatus(attempt_count=2),
                          history=records_pb2.TaskHistory(),
                          timestamp=start + 1_000_000)).result()

    again = Delivery(topic, 0, 7, value)  # the partition was rewound below offset 7
    intake.offer(again)
    eventually(lambda: again.outcomes == ["ack"], timeout=10, message="acked after its read")
    assert not owner.has_changes() and owner.stats()["held"] == 0
    assert tasks.get(key).state == State.TASK_STATE_SUCCEEDED


def test_a_cancel_of_a_task_the_owner_let_go_before_taking_the_record_still_cancels_it(
        cassandra):
    """A cancel record offered while the owner holds its task is taken a moment later, when
    the task may have been written and let go: its stored state decides, not the memory."""
    it = owned_task(cassandra, state=State.TASK_STATE_SCHEDULED, schedule=timedelta(hours=1))
    tasks, key, spec, owner, intake = it.tasks, it.key, it.spec, it.owner, it.intake
    topic = spec.topic
    fresh = records_pb2.TaskMessage(tenant_id=key.tenant_id, task_id=key.task_id,
                                    function="echo", create_time=spec.task.create_time,
                                    schedule_time=spec.task.schedule_time)
    created = Delivery(topic, 0, 2,
                       records_pb2.TaskMessageBatch(tasks=[fresh]).SerializeToString())
    intake.offer(created)
    eventually(lambda: owner.stats()["held"] == 1, timeout=10, message="the task held")

    # The cancel arrives while the task is held, and waits behind other intake work...
    blocked, release = threading.Event(), threading.Event()
    intake._reads.submit(lambda: (blocked.set(), release.wait(10)))
    assert blocked.wait(10)
    cancel = records_pb2.TaskMessage(tenant_id=key.tenant_id, task_id=key.task_id,
                                     function="echo", kind=records_pb2.MESSAGE_KIND_CANCEL,
                                     reason="batch cancel")
    record = Delivery(topic, 0, 3,
                      records_pb2.TaskMessageBatch(tasks=[cancel]).SerializeToString())
    intake.offer(record)
    # ...while its timer is written and the owner lets it go.
    owner.flushed(owner.collect())
    assert created.outcomes == ["ack"] and owner.stats()["held"] == 0
    release.set()

    eventually(lambda: owner.has_changes(), timeout=10, message="the cancel taken")
    batch = owner.collect()
    for write in batch.writes:  # what the Flusher does with a batch
        tasks.write(write).result()
    owner.flushed(batch)
    assert record.outcomes == ["ack"]
    assert tasks.get(key).state == State.TASK_STATE_CANCELLED
