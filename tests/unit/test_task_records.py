"""The records of the task topics, and the order in which the sweeper visits minutes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, tasks_pb2

from libs.cassandra.submissions import Submission
from libs.cassandra.taskstate import StoredTask, TaskKey, timestamp_of
from libs.taskqueue import (
    MAX_RECORD_BYTES,
    cancel_message,
    message_of,
    messages_of,
    records_by_partition,
    redrive_message,
)
from services.gateway.sweeper import SubmissionSweeper

Kind = records_pb2.MessageKind
NOW = datetime(2026, 11, 30, 12, 5, 30, tzinfo=UTC)


def spec(task_id: str = "t1", *, payload: bytes = b"p", partition: int = 0,
         **task: object) -> records_pb2.TaskSpec:
    return records_pb2.TaskSpec(tenant_id="acme", topic="w.tasks.normal", partition=partition,
                                task=tasks_pb2.Task(task_id=task_id, function="resize",
                                                    payload=payload, priority=2,
                                                    create_time=timestamp_of(NOW), **task))


def test_a_task_message_carries_what_its_owner_needs_to_run_it_without_a_read():
    retry = common_pb2.RetryConfig(max_attempts=7)
    target = common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(url="https://x.test/h"))
    message = message_of(spec(labels={"a": "b"}, expire_time=timestamp_of(NOW + timedelta(1)),
                              retry_config=retry, result_targets=[target]),
                         attempt_number=1, enqueue_time=timestamp_of(NOW))
    assert (message.tenant_id, message.task_id, message.function, message.payload,
            message.priority, message.attempt_number, message.kind, message.check_state) == (
        "acme", "t1", "resize", b"p", 2, 1, Kind.MESSAGE_KIND_UNSPECIFIED, False)
    assert message.labels == {"a": "b"}
    assert message.retry_config == retry and list(message.result_targets) == [target]
    assert message.create_time == timestamp_of(NOW)
    assert message.expire_time == timestamp_of(NOW + timedelta(1))


def test_only_a_schedule_still_ahead_is_carried():
    later = spec(schedule_time=timestamp_of(NOW + timedelta(seconds=30)))
    ahead = message_of(later, attempt_number=1, enqueue_time=timestamp_of(NOW))
    swept = message_of(later, attempt_number=1, check_state=True,
                       enqueue_time=timestamp_of(NOW + timedelta(minutes=2)))
    assert ahead.schedule_time == later.task.schedule_time
    assert not swept.HasField("schedule_time") and swept.check_state


def test_a_cancel_carries_its_reason_and_no_payload():
    message = cancel_message(spec(payload=b"x" * 1000), reason="not needed")
    assert (message.kind, message.reason, message.payload, message.task_id) == (
        Kind.MESSAGE_KIND_CANCEL, "not needed", b"", "t1")


def test_a_redrive_is_the_next_attempt_with_the_latest_payload_and_is_checked():
    failed = StoredTask(spec=spec(), state=tasks_pb2.TaskState.TASK_STATE_FAILED,
                        status=records_pb2.TaskStatus(attempt_count=3),
                        payload_override=b"patched before")
    kept = redrive_message(failed, payload_override=None)
    patched = redrive_message(failed, payload_override=b"patched now")
    assert (kept.kind, kept.check_state, kept.attempt_number, kept.payload) == (
        Kind.MESSAGE_KIND_REDRIVE, True, 4, b"patched before")
    assert not kept.HasField("payload_override")
    assert (patched.payload, patched.payload_override) == (b"patched now", b"patched now")


def test_records_go_one_per_partition_with_their_messages_in_order():
    routed = [("w.tasks.normal", i % 3, message_of(spec(f"t{i}", partition=i % 3),
                                                   attempt_number=1)) for i in range(30)]
    records = records_by_partition(routed)
    assert [(r.topic, r.partition) for r in records] == [("w.tasks.normal", p) for p in range(3)]
    for record in records:
        assert [m.task_id for m in messages_of(record.value)] == [
            f"t{i}" for i in range(30) if i % 3 == record.partition]


def test_large_messages_split_a_partitions_record_below_the_cap_in_order():
    big = b"x" * (MAX_RECORD_BYTES // 3)
    routed = [("w.tasks.normal", 0, message_of(spec(f"t{i}", payload=big), attempt_number=1))
              for i in range(7)]
    records = records_by_partition(routed)
    assert len(records) == 4 and all(len(r.value) <= MAX_RECORD_BYTES for r in records)
    assert [m.task_id for r in records for m in messages_of(r.value)] == [
        f"t{i}" for i in range(7)]


class Minutes:
    """A submission store that remembers which minutes were read, and fails on request."""

    def __init__(self) -> None:
        self.read: list[datetime] = []
        self.failing: set[datetime] = set()

    def unconfirmed(self, minute: datetime) -> list[tuple[Submission, list[TaskKey]]]:
        if minute in self.failing:
            raise RuntimeError("Cassandra is away")
        self.read.append(minute)
        return []


def sweeper_at(clock: list[datetime], minutes: Minutes) -> SubmissionSweeper:
    return SubmissionSweeper(submissions=minutes, tasks=None, producer=None,  # type: ignore[arg-type]
                             grace=timedelta(seconds=5), clock=lambda: clock[0])


def test_the_sweeper_visits_each_ended_minute_once_in_order_from_an_hour_back():
    clock, minutes = [NOW], Minutes()
    sweeper = sweeper_at(clock, minutes)
    sweeper.sweep()
    first, last = NOW.replace(hour=11, second=0), NOW.replace(minute=4, second=0)
    assert minutes.read == [first + timedelta(minutes=i) for i in range(60)]
    assert minutes.read[-1] == last
    clock[0] = NOW.replace(minute=6, second=4)  # 12:05 ended, but not 5 s ago
    sweeper.sweep()
    assert len(minutes.read) == 60
    clock[0] = NOW.replace(minute=6, second=5)
    sweeper.sweep()
    assert minutes.read[60:] == [NOW.replace(second=0)]


def test_a_minute_that_fails_is_swept_again_next_round_and_none_is_skipped():
    clock, minutes = [NOW], Minutes()
    sweeper = sweeper_at(clock, minutes)
    sweeper.sweep()
    clock[0] = NOW + timedelta(minutes=3)
    stuck = NOW.replace(second=0)
    minutes.failing.add(stuck)
    with pytest.raises(RuntimeError):
        sweeper.sweep()
    minutes.failing.clear()
    sweeper.sweep()
    assert minutes.read[60:] == [stuck, stuck + timedelta(minutes=1),
                                 stuck + timedelta(minutes=2)]
