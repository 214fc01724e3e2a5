"""Putting tasks on their Kafka topic: the one encoding gateways and sweepers share."""

from __future__ import annotations

from weir.storage.v1 import records_pb2

from libs.kafka.client import Record


def task_record_to_kafka(record: records_pb2.TaskRecord, *, attempt_number: int = 1) -> Record:
    """The Kafka record of a stored task, on the topic and partition the router gave it.

    Keyed by task ID; carries everything a dispatcher needs to push it without a read.
    """
    task = record.task
    message = records_pb2.TaskMessage(
        tenant_id=record.tenant_id, task_id=task.task_id, function=task.function,
        payload=task.payload, priority=task.priority, attempt_number=attempt_number,
        enqueue_time=task.update_time if task.HasField("update_time") else task.create_time)
    if task.HasField("expire_time"):
        message.expire_time.CopyFrom(task.expire_time)
    return Record(topic=record.topic, value=message.SerializeToString(),
                  key=task.task_id.encode(), partition=record.partition)
