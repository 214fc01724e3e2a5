"""Producing and consuming on Kafka, with acknowledgements that commit safely.

`Producer.send_all` returns only once every record is durable on the broker (acks=all).
`Consumer.poll` hands out `Message`s carrying topic, partition and offset; each must be
`ack()`ed when handled or `nack()`ed to have it delivered again. `Consumer.commit` commits,
per partition, only past messages that are all acknowledged (see `acks.PartitionAckTracker`),
so a crash never skips an unfinished message: delivery is at-least-once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from libs.kafka.acks import PartitionAckTracker
from libs.kafka.topics import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Record:
    """One record to produce. ``partition`` None lets the key (or the client) choose."""

    topic: str
    value: bytes
    key: bytes | None = None
    partition: int | None = None
    headers: Headers = field(default_factory=list)


class Producer:
    """Produces records and waits until the broker has them durably (acks=all, idempotent)."""

    def __init__(self, *, bootstrap: str, client_id: str, linger_ms: int = 2) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","), client_id=client_id, acks="all",
            enable_idempotence=True, linger_ms=linger_ms, retries=5,
            request_timeout_ms=10_000, max_block_ms=10_000, max_request_size=MAX_MESSAGE_BYTES)

    def send_all(self, records: Iterable[Record], *, timeout_seconds: float = 10.0) -> None:
        """Produces every record and returns when all are acknowledged by the broker.

        Raises:
            kafka.errors.KafkaError: when any record could not be produced in time; some of
                the others may have been, so callers re-send idempotent records only.
        """
        pending = [self._producer.send(r.topic, value=r.value, key=r.key,
                                       partition=r.partition, headers=r.headers)
                   for r in records]
        self._producer.flush(timeout=timeout_seconds)
        for future in pending:
            future.get(timeout=timeout_seconds)

    def close(self, timeout_seconds: float = 5.0) -> None:
        self._producer.close(timeout=timeout_seconds)


class Message:
    """A consumed record; call exactly one of `ack` or `nack` when done with it."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "headers", "_tracker",
                 "_consumer")

    def __init__(self, *, topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes, headers: Headers, tracker: PartitionAckTracker,
                 consumer: Consumer) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers
        self._tracker = tracker
        self._consumer = consumer

    def ack(self) -> None:
        """Done: the offset may be committed once every earlier message is done too."""
        self._tracker.ack(self.offset)

    def nack(self) -> None:
        """Not handled: the partition is rewound so this message is delivered again."""
        self._consumer._rewind(self)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def on_partitions_revoked(self, revoked):
        # Best effort: kafka-python runs this on its IO thread, where a blocking commit is
        # refused, so the commit is asynchronous and may lose the race with the rebalance.
        # Then the new owner redelivers what was done since the last commit (at-least-once).
        self._consumer.commit(revoked, wait=False)
        self._consumer._forget(revoked)

    def on_partitions_assigned(self, assigned):
        log.info("partitions assigned", extra={"partitions": [f"{tp.topic}/{tp.partition}"
                                                              for tp in assigned]})


class Consumer:
    """A consumer-group member. Not thread-safe except `Message.ack`/`nack`, which are."""

    def __init__(self, *, bootstrap: str, group_id: str, topics: Sequence[str],
                 client_id: str, max_poll_records: int = 500,
                 session_timeout_ms: int = 10_000) -> None:
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","), group_id=group_id, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=max_poll_records, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(session_timeout_ms // 4, 250),
            metadata_max_age_ms=10_000)
        self._await_partitions(topics, timeout_seconds=60)
        self._consumer.subscribe(list(topics), listener=_Rebalance(self))
        self._trackers: dict[TopicPartition, PartitionAckTracker] = {}
        self._rewinds: set[TopicPartition] = set()
        self._lock = threading.Lock()

    def _await_partitions(self, topics: Sequence[str], *, timeout_seconds: float) -> None:
        """Waits until the broker reports partitions for every topic.

        A member that joins its group while a just-created topic has no metadata yet is
        assigned nothing, and kafka-python does not rejoin when the partitions appear (not
        until the metadata's max age): a fresh `make run` would consume nothing.
        """
        deadline = time.monotonic() + timeout_seconds
        missing = list(topics)
        while missing:
            missing = [t for t in missing if not self._consumer.partitions_for_topic(t)]
            if missing and time.monotonic() > deadline:
                raise RuntimeError(f"no partitions for topics {missing} after "
                                   f"{timeout_seconds:.0f}s: were they created?")
            if missing:
                time.sleep(0.2)

    def poll(self, timeout_seconds: float = 1.0) -> list[Message]:
        """Fetches the next messages of the owned partitions, in offset order per partition."""
        self._apply_rewinds()
        batches = self._consumer.poll(timeout_ms=int(timeout_seconds * 1000))
        messages = []
        for tp, records in batches.items():
            tracker = self._trackers.get(tp)
            if tracker is None:
                tracker = self._trackers[tp] = PartitionAckTracker(start_offset=records[0].offset)
            for r in records:
                tracker.track(r.offset)
                messages.append(Message(
                    topic=r.topic, partition=r.partition, offset=r.offset, key=r.key,
                    value=r.value, headers=list(r.headers or []), tracker=tracker,
                    consumer=self))
        return messages

    def commit(self, partitions: Iterable[TopicPartition] | None = None, *,
               wait: bool = True) -> dict[TopicPartition, int]:
        """Commits each owned partition up to its lowest unacknowledged offset."""
        chosen = self._trackers if partitions is None else set(partitions) & set(self._trackers)
        offsets = {tp: self._trackers[tp].commit_offset() for tp in chosen}
        if offsets:
            request = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
            if wait:
                self._consumer.commit(request)
            else:
                self._consumer.commit_async(request)
        return offsets

    def close(self) -> None:
        """Commits what is safe and leaves the group, so partitions move on at once."""
        try:
            self.commit()
        finally:
            self._consumer.close(autocommit=False)

    def _rewind(self, message: Message) -> None:
        tp = TopicPartition(message.topic, message.partition)
        with self._lock:
            if self._trackers.get(tp) is message._tracker:
                self._rewinds.add(tp)

    def _apply_rewinds(self) -> None:
        with self._lock:
            rewinds, self._rewinds = self._rewinds, set()
        for tp in rewinds:
            old = self._trackers.get(tp)
            if old is None or tp not in self._consumer.assignment():
                continue
            # Back to the lowest unacknowledged offset (at or before the nacked one): committing
            # from there stays safe. Later messages come again too, and acks of their earlier
            # copies land on the old tracker, where they no longer count.
            offset = old.commit_offset()
            self._trackers[tp] = PartitionAckTracker(start_offset=offset)
            self._consumer.seek(tp, offset)

    def _forget(self, partitions) -> None:
        for tp in partitions:
            self._trackers.pop(tp, None)


class ConsumerLoop:
    """Polls a consumer on its own thread, hands each message to ``on_message`` and commits
    what is safe after every poll; `stop` lets the current poll finish, then leaves the group.

    ``on_message`` owns the message from then on: it acks or nacks it, now or later (from
    another thread); if it raises, the message is nacked and delivered again.
    """

    def __init__(self, consumer: Consumer, on_message: Callable[[Message], None], *,
                 name: str) -> None:
        self._consumer = consumer
        self._on_message = on_message
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ConsumerLoop:
        self._thread.start()
        return self

    def stop(self, before_close: Callable[[], None] = lambda: None) -> None:
        """Stops polling; ``before_close`` runs before the final commit (e.g. to let work
        in flight ack its messages)."""
        self._stopping.set()
        self._thread.join(30)
        before_close()
        self._consumer.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            for message in self._consumer.poll(0.2):
                try:
                    self._on_message(message)
                except Exception:
                    log.exception("message handling failed; it will be delivered again")
                    message.nack()
            self._consumer.commit()
