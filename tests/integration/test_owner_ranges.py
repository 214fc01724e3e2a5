"""Partition owners on real Cassandra: epochs, timestamp ranges, and a zombie's write losing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.owners import OwnershipLost, PartitionOwners, TimestampRange
from libs.cassandra.taskstate import TaskKey, TaskStateStore, TaskWrite, timestamp_of
from tests.helpers import unique

State = tasks_pb2.TaskState


def test_each_epoch_takes_a_range_after_every_earlier_one(cassandra):
    owners = PartitionOwners(cassandra)
    topic = unique("topic")
    first = owners.acquire(topic, 0, "a")
    second = owners.acquire(topic, 0, "b")
    assert (first.epoch, second.epoch) == (1, 2)
    assert second.range_start >= first.range_end
    assert first.timer_minute is not None
    assert owners.epochs(topic) == {0: 2}


def test_a_stale_epoch_cannot_renew_its_range(cassandra):
    owners = PartitionOwners(cassandra)
    topic = unique("topic")
    stale = owners.acquire(topic, 1, "a")
    renewed = owners.renew(stale)
    assert renewed.range_end >= stale.range_end
    owners.acquire(topic, 1, "b")
    with pytest.raises(OwnershipLost):
        owners.renew(renewed)


def test_a_zombie_owners_write_loses_to_the_new_owners_even_when_it_lands_later(cassandra):
    owners, tasks = PartitionOwners(cassandra), TaskStateStore(cassandra)
    topic = unique("topic")
    key = TaskKey(unique("tenant"), "t1")
    spec = records_pb2.TaskSpec(tenant_id=key.tenant_id, topic=topic, partition=2)
    spec.task.task_id, spec.task.function = key.task_id, "echo"
    spec.task.create_time.CopyFrom(timestamp_of(datetime.now(UTC)))
    tasks.create(spec, state=State.TASK_STATE_QUEUED,
                 stages=[tasks_pb2.TaskStage(state=State.TASK_STATE_QUEUED)]).result()
    zombie = TimestampRange(owners.acquire(topic, 2, "zombie"))
    zombie_stamp = zombie.next()  # taken before the takeover, written after
    heir = TimestampRange(owners.acquire(topic, 2, "heir"))

    def write(state: int, stamp: int, detail: str) -> None:
        tasks.write(TaskWrite(key=key, state=state, status=records_pb2.TaskStatus(),
                              history=records_pb2.TaskHistory(stages=[tasks_pb2.TaskStage(
                                  state=state, detail=detail)]), timestamp=stamp)).result()

    write(State.TASK_STATE_DISPATCHED, heir.next(), "heir")
    write(State.TASK_STATE_SUCCEEDED, zombie_stamp, "zombie")
    stored = tasks.get(key)
    assert stored.state == State.TASK_STATE_DISPATCHED
    # The zombie's history row exists (a new cell) but sorts before the heir's.
    assert [row.stages[0].detail for row in stored.history[-2:]] == ["zombie", "heir"]


def test_a_deleted_task_stays_deleted_whatever_an_owner_writes_after(cassandra):
    owners, tasks = PartitionOwners(cassandra), TaskStateStore(cassandra)
    topic = unique("topic")
    key = TaskKey(unique("tenant"), "gone")
    spec = records_pb2.TaskSpec(tenant_id=key.tenant_id, topic=topic, partition=0)
    spec.task.task_id = key.task_id
    spec.task.create_time.CopyFrom(timestamp_of(datetime.now(UTC)))
    tasks.create(spec, state=State.TASK_STATE_QUEUED,
                 stages=[tasks_pb2.TaskStage(state=State.TASK_STATE_QUEUED)]).result()
    stamps = TimestampRange(owners.acquire(topic, 0, "a"))
    tasks.delete(key)
    tasks.write(TaskWrite(key=key, state=State.TASK_STATE_SUCCEEDED,
                          status=records_pb2.TaskStatus(), history=records_pb2.TaskHistory(),
                          timestamp=stamps.next())).result()
    assert tasks.get(key) is None
