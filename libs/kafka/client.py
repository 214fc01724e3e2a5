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
from kafka.errors import KafkaError
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


# A producer whose sends have all failed for this long is replaced by a new client: after a
# long broker outage kafka-python's idempotent producer can stay wedged, every send timing
# out although the broker is back (a gateway still was two minutes after a 100 s outage).
# A new client, with a new producer id, works at once; during an outage it fails like the
# old one, and the replacing is tried again a while later.
REPLACE_AFTER_SECONDS = 30.0


class Producer:
    """Produces records and waits until the broker has them durably (acks=all, idempotent)."""

    def __init__(self, *, bootstrap: str, client_id: str, linger_ms: int = 2,
                 make: Callable[[], KafkaProducer] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 in_background: Callable[[Callable[[], None]], None] | None = None) -> None:
        self._make = make or (lambda: KafkaProducer(
            bootstrap_servers=bootstrap.split(","), client_id=client_id, acks="all",
            enable_idempotence=True, linger_ms=linger_ms, retries=5,
            request_timeout_ms=10_000, max_block_ms=10_000, max_request_size=MAX_MESSAGE_BYTES))
        self._producer = self._make()
        self._clock = clock
        # Making a client waits up to 30 s for a broker: never on a caller's thread.
        self._in_background = in_background or (lambda work: threading.Thread(
            target=work, daemon=True, name="kafka-producer-replace").start())
        self._failing_since: float | None = None  # when sends began to fail, all of them
        self._replacing = False
        self._lock = threading.Lock()

    def send_all(self, records: Iterable[Record], *, timeout_seconds: float = 10.0) -> None:
        """Produces every record and returns when all are acknowledged by the broker.

        Waits for these records only, not the whole producer: a `flush` would also wait for
        every other caller's records (and send half-filled batches early for all of them).
        The sender ships a batch when it fills or after ``linger_ms``.

        Raises:
            kafka.errors.KafkaError: when any record could not be produced in time; some of
                the others may have been, so callers re-send idempotent records only.
        """
        producer = self._producer
        deadline = time.monotonic() + timeout_seconds
        try:
            pending = [producer.send(r.topic, value=r.value, key=r.key,
                                     partition=r.partition, headers=r.headers)
                       for r in records]
            for future in pending:
                future.get(timeout=max(deadline - time.monotonic(), 0.001))
        except KafkaError:
            self._failed(producer)
            raise
        self._failing_since = None

    def _failed(self, producer: KafkaProducer) -> None:
        with self._lock:
            now = self._clock()
            if self._failing_since is None:
                self._failing_since = now
            if (self._replacing or producer is not self._producer
                    or now - self._failing_since < REPLACE_AFTER_SECONDS):
                return
            self._replacing = True
            log.warning("every send failed for %.0f s: replacing the Kafka producer",
                        now - self._failing_since)
        self._in_background(lambda: self._replace(producer))

    def _replace(self, old: KafkaProducer) -> None:
        try:
            new = self._make()
        except KafkaError as exc:  # the broker is still away: try again after a while
            log.warning("could not make a new Kafka producer: %s", exc)
            with self._lock:
                self._replacing, self._failing_since = False, self._clock()
            return
        with self._lock:
            self._producer, self._failing_since, self._replacing = new, None, False
        old.close(timeout=1.0)  # its unsent records fail their callers, who send them again

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

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Best effort: kafka-python runs this on its IO thread, where a blocking commit is
        # refused, so the commit is asynchronous and may lose the race with the rebalance.
        # Then the new owner redelivers what was done since the last commit (at-least-once).
        try:
            self._consumer.commit(revoked, wait=False)
        except Exception:  # a broker gone away: the next owner replays a little more
            log.warning("could not commit revoked partitions", exc_info=True)
        self._consumer._forget(revoked)
        self._consumer.on_revoked(set(revoked))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        # Evicted (a session that ran out): others may have had the partitions since, so the
        # next assignment starts from the group's committed offsets, not from what this
        # member remembers.
        self._consumer._forget(lost)
        self._consumer._unacked_from = {}
        self._consumer.on_revoked(set(lost))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [f"{tp.topic}/{tp.partition}"
                                                              for tp in assigned]})
        self._consumer._rewind_retained(assigned)
        self._consumer.on_assigned(set(assigned))


class Consumer:
    """A consumer-group member. Not thread-safe except `Message.ack`/`nack`, which are."""

    def __init__(self, *, bootstrap: str, group_id: str, topics: Sequence[str],
                 client_id: str, max_poll_records: int = 500,
                 session_timeout_ms: int = 10_000, instance_id: str | None = None,
                 on_assigned: Callable[[set[TopicPartition]], None] = lambda tps: None,
                 on_revoked: Callable[[set[TopicPartition]], None] = lambda tps: None) -> None:
        # Called on kafka-python's IO thread: they may only hand work to other threads.
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","), group_id=group_id, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=max_poll_records, session_timeout_ms=session_timeout_ms,
            group_instance_id=instance_id,
            heartbeat_interval_ms=max(session_timeout_ms // 4, 250),
            metadata_max_age_ms=10_000)
        self._await_partitions(topics, timeout_seconds=60)
        self._consumer.subscribe(list(topics), listener=_Rebalance(self))
        self._trackers: dict[TopicPartition, PartitionAckTracker] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._rewinds: set[TopicPartition] = set()
        self._unacked_from: dict[TopicPartition, int] = {}  # of partitions just revoked
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

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stops fetching these partitions (polling goes on: the membership stays alive)."""
        owned = set(partitions) & self._consumer.assignment()
        if owned:
            self._consumer.pause(*owned)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        owned = set(partitions) & self._consumer.assignment()
        if owned:
            self._consumer.resume(*owned)

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset after each partition's last record, now."""
        return self._consumer.end_offsets(list(partitions))

    def unread(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Records not fetched yet per assigned partition: its end now less this consumer's
        position (one ListOffsets request; on the consumer's thread, like every call here)."""
        owned = list(set(partitions) & self._consumer.assignment())
        if not owned:
            return {}
        ends = self._consumer.end_offsets(owned)
        return {tp: max(0, ends[tp] - self._consumer.position(tp)) for tp in owned
                if tp in ends}

    def commit(self, partitions: Iterable[TopicPartition] | None = None, *,
               wait: bool = True) -> dict[TopicPartition, int]:
        """Commits each owned partition up to its lowest unacknowledged offset."""
        chosen = self._trackers if partitions is None else set(partitions) & set(self._trackers)
        offsets = {tp: self._trackers[tp].commit_offset() for tp in chosen}
        # Only what moved since the last commit: an idle partition costs no request.
        offsets = {tp: o for tp, o in offsets.items() if self._committed.get(tp) != o}
        self._committed.update(offsets)
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

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        """A revoked partition: what was read and not acknowledged must be read again, by
        whichever member gets it next — this one too."""
        for tp in partitions:
            tracker = self._trackers.pop(tp, None)
            if tracker is not None:
                self._unacked_from[tp] = tracker.commit_offset()
            self._committed.pop(tp, None)

    def _rewind_retained(self, assigned: set[TopicPartition]) -> None:
        """kafka-python keeps a partition's fetch position when a rebalance gives it back to
        the same member, past records it read and never acknowledged (their handler dropped
        them at the revocation): back to the lowest of those. A seek only sets the position,
        so it is safe on the IO thread, and it discards records already fetched."""
        for tp in assigned:
            offset = self._unacked_from.get(tp)
            if offset is not None:
                self._consumer.seek(tp, offset)
        self._unacked_from = {}


class ConsumerLoop:
    """Polls a consumer on its own thread, hands each message to ``on_message`` and commits
    what is safe after every poll; `stop` lets the current poll finish, then leaves the group.

    ``on_message`` owns the message from then on: it acks or nacks it, now or later (from
    another thread); if it raises, the message is nacked and delivered again. ``between``
    runs on the loop's thread before each poll (the consumer is not thread-safe: pausing,
    resuming and asking offsets happen there). ``rank`` orders a poll's messages by topic,
    lowest first (each partition's stay in offset order): the dispatcher takes HIGH records
    before the LOW ones fetched with them.

    A broker that goes away and comes back is an outage, not an end: a failed poll or commit
    is logged and tried again, and kafka-python rejoins the group by itself. Anything else
    that escapes ends the loop and calls ``on_death`` (the service then says NOT_SERVING and
    exits, for a supervisor to restart it).
    """

    def __init__(self, consumer: Consumer, on_message: Callable[[Message], None], *,
                 name: str, between: Callable[[], None] = lambda: None,
                 on_death: Callable[[BaseException], None] = lambda exc: None,
                 poll_seconds: float = 0.2, rank: Callable[[str], int] | None = None) -> None:
        self._consumer = consumer
        self._rank = rank
        self._on_message = on_message
        self._between = between
        self._on_death = on_death
        self._poll_seconds = poll_seconds
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

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported, then the service exits
            log.exception("the consumer loop died")
            self._on_death(exc)

    def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._between()
            try:
                messages = self._consumer.poll(self._poll_seconds)
            except KafkaError:
                failures += 1
                log.warning("poll failed; trying again", exc_info=failures == 1)
                self._stopping.wait(min(0.1 * failures, 2.0))
                continue
            if (rank := self._rank) is not None:
                messages.sort(key=lambda m: rank(m.topic))  # stable: offsets stay in order
            for message in messages:
                try:
                    self._on_message(message)
                except Exception:
                    log.exception("message handling failed; it will be delivered again")
                    message.nack()
            try:
                self._consumer.commit(wait=False)
                failures = 0
            except KafkaError:  # e.g. a rebalance after a broker restart: commit next time
                failures += 1
                log.warning("commit failed; trying again", exc_info=failures == 1)
