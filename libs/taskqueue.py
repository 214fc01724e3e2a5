"""The records of the task topics: one encoding for the gateway, its sweeper and the owners.

Every record of a task topic is a `TaskMessageBatch` of `TaskMessage`s for the record's own
partition: a submission's tasks travel together, one record per partition, and a control
record (CANCEL, REDRIVE, a resumed task) is a batch of one. The partition is always the
task's own (``spec.topic``/``spec.partition``), so Kafka orders a control record after the
task it is about.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp
from weir.storage.v1 import records_pb2

from libs.batching import chunks_by_size
from libs.cassandra.taskstate import StoredTask, now_utc, timestamp_of
from libs.kafka.client import Record
from libs.kafka.topics import MAX_MESSAGE_BYTES

Kind = records_pb2.MessageKind
# A record's messages stop growing at this size, so a batch of large payloads becomes several
# records, each well below what the topics accept (a lone message may exceed it).
MAX_RECORD_BYTES = MAX_MESSAGE_BYTES // 2

# (topic, partition, message): a message and where it goes.
Routed = tuple[str, int, records_pb2.TaskMessage]


def message_of(spec: records_pb2.TaskSpec, *, attempt_number: int,
               kind: Kind = Kind.MESSAGE_KIND_UNSPECIFIED, check_state: bool = False,
               enqueue_time: Timestamp | None = None) -> records_pb2.TaskMessage:
    """The message that asks the owner to run a task (or, with ``kind``, re-drive it).

    It carries everything the owner needs to run the task without a read. ``check_state``
    asks the owner to read the task's state first: the record may repeat one it handled.
    ``enqueue_time`` defaults to now (a batch passes one for all its messages).
    """
    task = spec.task
    enqueue_time = enqueue_time or timestamp_of(now_utc())
    message = records_pb2.TaskMessage(
        tenant_id=spec.tenant_id, task_id=task.task_id, function=task.function,
        payload=task.payload, priority=task.priority, attempt_number=attempt_number,
        enqueue_time=enqueue_time, create_time=task.create_time, labels=task.labels,
        result_targets=task.result_targets, kind=kind, check_state=check_state,
        trace_context=spec.trace_context)
    if task.HasField("retry_config"):
        message.retry_config.CopyFrom(task.retry_config)
    if task.HasField("expire_time"):
        message.expire_time.CopyFrom(task.expire_time)
    # Only a schedule still ahead keeps the task waiting; a past one means "run now".
    if task.HasField("schedule_time") and _later(task.schedule_time, enqueue_time):
        message.schedule_time.CopyFrom(task.schedule_time)
    return message


def redrive_message(stored: StoredTask, *, payload_override: bytes | None
                    ) -> records_pb2.TaskMessage:
    """Asks the owner to run a FAILED task again as its next attempt (checked against its
    state), optionally with a new payload for this and later attempts."""
    message = message_of(stored.spec, attempt_number=stored.status.attempt_count + 1,
                         kind=Kind.MESSAGE_KIND_REDRIVE, check_state=True)
    message.payload = stored.payload  # an earlier re-drive's replacement, if any
    if payload_override is not None:
        message.payload = payload_override
        message.payload_override = payload_override
    return message


def cancel_message(spec: records_pb2.TaskSpec, *, reason: str) -> records_pb2.TaskMessage:
    """Asks the owner to cancel a task; no payload, the owner holds the task."""
    task = spec.task
    return records_pb2.TaskMessage(
        tenant_id=spec.tenant_id, task_id=task.task_id, function=task.function,
        priority=task.priority, kind=Kind.MESSAGE_KIND_CANCEL, reason=reason,
        enqueue_time=timestamp_of(now_utc()), create_time=task.create_time)


def records_by_partition(messages: Iterable[Routed]) -> list[Record]:
    """One `TaskMessageBatch` record per (topic, partition), messages in the order given.

    A partition whose messages exceed `MAX_RECORD_BYTES` gets several records, in order.
    """
    grouped: dict[tuple[str, int], list[records_pb2.TaskMessage]] = {}
    for topic, partition, message in messages:
        grouped.setdefault((topic, partition), []).append(message)
    records = []
    for (topic, partition), group in grouped.items():
        for chunk in chunks_by_size(group, MAX_RECORD_BYTES):
            value = records_pb2.TaskMessageBatch(tasks=chunk).SerializeToString()
            records.append(Record(topic=topic, value=value, partition=partition))
    return records


def messages_of(value: bytes) -> list[records_pb2.TaskMessage]:
    """The messages of one task-topic record, in order."""
    return list(records_pb2.TaskMessageBatch.FromString(value).tasks)


def _later(a: Timestamp, b: Timestamp) -> bool:
    return (a.seconds, a.nanos) > (b.seconds, b.nanos)
