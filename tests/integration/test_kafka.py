"""The Kafka layer on the real broker: durable produce, consume, acks into safe commits."""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from kafka.admin import KafkaAdminClient

from libs.kafka.client import Consumer, Message, Producer, Record
from libs.kafka.topics import TopicSpec, ensure_topics
from tests.helpers import eventually, unique


@pytest.fixture
def topic(suite_config) -> str:
    name = unique("it-topic").replace("_", "-")
    ensure_topics(bootstrap=suite_config.kafka_bootstrap, specs=[TopicSpec(name, 1)],
                  replication_factor=1)
    return name


@pytest.fixture
def producer(suite_config):
    p = Producer(bootstrap=suite_config.kafka_bootstrap, client_id="it-producer")
    yield p
    p.close()


def consumer_for(config, topic: str, group: str) -> Consumer:
    return Consumer(bootstrap=config.kafka_bootstrap, group_id=group, topics=[topic],
                    client_id="it-consumer", session_timeout_ms=6000)


def receive(consumer: Consumer, count: int) -> list[Message]:
    got: list[Message] = []

    def enough():
        got.extend(consumer.poll(0.5))
        return len(got) >= count

    eventually(enough, timeout=60, message=f"{count} messages consumed")
    return got


def test_produced_records_are_consumed_in_order_with_their_keys_and_headers(
        suite_config, topic, producer):
    producer.send_all(Record(topic, f"v{i}".encode(), key=b"k", headers=[("trace", b"t1")])
                      for i in range(5))
    consumer = consumer_for(suite_config, topic, unique("g"))
    try:
        messages = receive(consumer, 5)
    finally:
        consumer.close()
    assert [m.value for m in messages] == [f"v{i}".encode() for i in range(5)]
    assert [m.offset for m in messages] == list(range(5))
    assert all(m.key == b"k" and m.headers == [("trace", b"t1")] for m in messages)


def test_out_of_order_acks_commit_only_past_finished_messages(suite_config, topic, producer):
    producer.send_all(Record(topic, f"v{i}".encode()) for i in range(10))
    group = unique("g")
    first = consumer_for(suite_config, topic, group)
    try:
        messages = receive(first, 10)
        for m in reversed(messages):
            if m.offset != 3:  # offset 3 is "still running" when the consumer goes away
                m.ack()
        committed = first.commit()
        assert list(committed.values()) == [3]
    finally:
        first.close()

    second = consumer_for(suite_config, topic, group)
    try:
        redelivered = receive(second, 7)
    finally:
        second.close()
    assert [m.offset for m in redelivered] == list(range(3, 10))


def test_a_nacked_message_is_delivered_again(suite_config, topic, producer):
    producer.send_all(Record(topic, f"v{i}".encode()) for i in range(4))
    consumer = consumer_for(suite_config, topic, unique("g"))
    try:
        messages = receive(consumer, 4)
        messages[0].ack()
        messages[1].ack()
        messages[2].nack()
        messages[3].ack()  # an ack of a message the rewind will redeliver: it no longer counts
        again = receive(consumer, 2)
        assert [m.offset for m in again] == [2, 3]
        assert list(consumer.commit().values()) == [2]
        for m in again:
            m.ack()
        assert list(consumer.commit().values()) == [4]
    finally:
        consumer.close()


def test_a_rebalance_that_gives_a_partition_back_redelivers_what_was_not_acked(
        suite_config, producer):
    """kafka-python keeps the fetch position of a partition a rebalance leaves with the same
    member; what that member read and had not acknowledged (its handler dropped it at the
    revocation) must come again — to it, or to the member that gets the partition."""
    topic = unique("it-topic").replace("_", "-")
    ensure_topics(bootstrap=suite_config.kafka_bootstrap, specs=[TopicSpec(topic, 2)],
                  replication_factor=1)
    producer.send_all(Record(topic, f"p{p}-{i}".encode(), partition=p)
                      for p in (0, 1) for i in range(4))
    group = unique("g")
    first = consumer_for(suite_config, topic, group)
    second = None
    try:
        for m in receive(first, 8):
            if m.offset != 2:  # offset 2 of each partition is in hand at the rebalance
                m.ack()
        second = consumer_for(suite_config, topic, group)
        again: dict[int, list[int]] = {0: [], 1: []}

        def both_redelivered() -> bool:
            for consumer in (first, second):
                for m in consumer.poll(0.3):
                    again[m.partition].append(m.offset)
            return all(2 in offsets for offsets in again.values())

        eventually(both_redelivered, timeout=60, message="offset 2 of each partition again")
        assert all(min(offsets) == 2 for offsets in again.values()), again
    finally:
        first.close()
        if second is not None:
            second.close()


def test_unread_counts_what_a_paused_partition_has_not_fetched(suite_config, topic, producer):
    """What admission sees of a backlog still on Kafka: records past the consumer's position,
    growing while the partition is paused (a backlogged dispatcher stops reading)."""
    producer.send_all(Record(topic, b"first") for _ in range(3))
    consumer = consumer_for(suite_config, topic, unique("g"))
    try:
        receive(consumer, 3)
        tp = TopicPartition(topic, 0)
        assert consumer.unread([tp]) == {tp: 0}
        consumer.pause([tp])
        producer.send_all(Record(topic, b"later") for _ in range(7))
        assert consumer.unread([tp]) == {tp: 7}
        assert consumer.unread([TopicPartition(topic, 5)]) == {}  # not assigned here
    finally:
        consumer.close()


def test_ensuring_topics_again_adds_partitions_to_a_topic_that_has_fewer(suite_config):
    """An older deployment's task topics lack the isolated partitions: they are added, and a
    topic is never shrunk."""
    name = unique("grown")
    bootstrap = suite_config.kafka_bootstrap
    assert ensure_topics(bootstrap=bootstrap, specs=[TopicSpec(name, 2)],
                         replication_factor=1) == [name]
    assert ensure_topics(bootstrap=bootstrap, specs=[TopicSpec(name, 4)],
                         replication_factor=1) == []
    ensure_topics(bootstrap=bootstrap, specs=[TopicSpec(name, 3)], replication_factor=1)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        [described] = admin.describe_topics([name])
        assert len(described["partitions"]) == 4
    finally:
        admin.close()
