"""Batches split by encoded size: no carrier grows past its limit, nothing is lost or reordered."""

from __future__ import annotations

from weir.storage.v1 import records_pb2

from libs.batching import chunks_by_size


def message(size: int, task_id: str) -> records_pb2.TaskMessage:
    return records_pb2.TaskMessage(task_id=task_id, payload=b"x" * size)


def test_chunks_stay_within_the_limit_and_keep_every_message_in_order():
    messages = [message(300, str(i)) for i in range(20)]
    chunks = chunks_by_size(messages, 1000)
    assert [m.task_id for chunk in chunks for m in chunk] == [str(i) for i in range(20)]
    assert len(chunks) > 1
    for chunk in chunks:
        assert records_pb2.TaskMessageBatch(tasks=chunk).ByteSize() <= 1000


def test_a_message_larger_than_the_limit_travels_alone():
    chunks = chunks_by_size([message(10, "a"), message(5000, "big"), message(10, "b")], 1000)
    assert [[m.task_id for m in chunk] for chunk in chunks] == [["a"], ["big"], ["b"]]


def test_nothing_gives_one_empty_chunk():
    assert chunks_by_size([], 1000) == [[]]
