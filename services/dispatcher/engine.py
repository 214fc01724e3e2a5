"""The dispatcher's moving parts around its `Owner`: intake, adoption, flushing, timers.

- `Intake` (the consumer thread's side) turns consumed records into `Owner.take` calls, in
  offset order per partition; records that need the task's stored state (control records,
  records produced again, records already on the partition when it was assigned) wait for
  their read, and the records behind them wait too.
- `Adoption` takes a newly assigned partition's next epoch, adopts the attempts its last
  owner sent out (from the in-flight index) and loads its timers, before its records flow.
- `Flusher` writes the owner's changes every few milliseconds — one INSERT per changed task,
  the index rows grouped, and beside them the logs of the attempts that ended (one INSERT
  each, concurrent with the rest) — then acknowledges records and publishes outcomes; it renews the
  epochs' timestamp ranges and checks, before writing, that the epochs are still ours.
- `TimerWheel` fires the owned partitions' timers when due.
- `LimitSync` renews the owner's shares of cluster-wide dispatch limits at the router and
  reports what waits (the backlog gateways admit by).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from cassandra.cluster import ResponseFuture
from kafka import TopicPartition
from opentelemetry.trace import SpanKind
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2

from libs import tracing
from libs.batching import chunks_by_size
from libs.cache import TtlCache
from libs.cassandra.attempt_logs import AttemptLogWriter
from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.owners import RANGE, Ownership, OwnershipLost, PartitionOwners
from libs.cassandra.parked import ParkedStore
from libs.cassandra.partition_index import MINUTE, PartitionIndex, Timer, minute_of
from libs.cassandra.taskstate import StoredTask, TaskKey, TaskStateStore, now_utc
from libs.cassandra.tenants import TenantStore
from libs.kafka.client import Consumer, Message, Producer, Record
from libs.taskqueue import MAX_RECORD_BYTES, records_by_partition
from services.dispatcher.metrics import DispatcherMetrics
from services.dispatcher.owner import HELD, FlushBatch, Owner, PartitionId, RecordAck

log = logging.getLogger(__name__)

Kind = records_pb2.MessageKind
FLUSH_SECONDS = 0.004  # changes wait at most this long to be written together
VERIFY_SECONDS = 0.1  # epochs are re-read before a flush when older than this
TIMER_MARGIN = timedelta(seconds=15)  # a minute's timers are done this long after it ends
# Consuming pauses where tasks taken pile up waiting (memory stays bounded): a partition's
# records at this many, and a whole topic's (one priority tier) at TIER_LIMIT. By tier, so a
# deep LOW backlog never stops HIGH records from being read.
PARTITION_LIMIT = 1000
TIER_LIMIT = 5000
SHARE_SECONDS = 0.25  # how often the limit shares are renewed at the router
PACE_EVERY_SECONDS = 0.02  # how often tasks a rate held back are let out as tokens come
UNREAD_SECONDS = 1.0  # how often the unread records of owned partitions are counted
PAUSE_CHECK_SECONDS = 0.02  # how often the piles are checked for pausing or resuming
ROUTER_COMPLAINT_SECONDS = 10.0  # an unreachable router is logged at most this often
MAX_BACKLOG_TENANTS = 10_000  # the largest backlogs reported; the router takes no more


def resolve(future: ResponseFuture) -> Future:
    """A concurrent.futures view of a driver future (callbacks, no thread waiting)."""
    done: Future = Future()
    future.add_callbacks(lambda rows: done.set_result(rows),
                         lambda exc: done.set_exception(exc))
    return done


class Functions:
    """Functions by (tenant, name), cached: a change reaches dispatching when the change feed
    reports it (`changed`), and within ``ttl`` regardless."""

    def __init__(self, store: FunctionStore, *, ttl: float = 1.0) -> None:
        self._cache = TtlCache(store.get, ttl=ttl)

    def get(self, tenant_id: str, name: str) -> functions_pb2.Function | None:
        return self._cache.get(tenant_id, name)

    def now(self, tenant_id: str, name: str, default: functions_pb2.Function | None
            ) -> functions_pb2.Function | None:
        """As cached, never waiting on a read (a stale entry is refreshed in the background):
        for decisions made under the owner's lock."""
        return self._cache.get_nowait(tenant_id, name, default=default)

    def fresh(self, tenant_id: str, name: str) -> functions_pb2.Function | None:
        """Read now, not from the cache (which it refreshes)."""
        self._cache.forget(tenant_id, name)
        return self._cache.get(tenant_id, name)

    def changed(self, tenant_id: str, name: str) -> None:
        """The function changed (`FunctionChangeFeed`): read it now, so that `now` returns it."""
        self._cache.reload(tenant_id, name)

    def lost(self) -> None:
        """Changes may have been missed: read each function again when next asked."""
        self._cache.clear()


class TenantLimits:
    """Tenants' dispatch limits over all their functions, cached like functions."""

    def __init__(self, store: TenantStore, *, ttl: float = 1.0) -> None:
        self._store = store
        self._cache = TtlCache(self._fetch, ttl=ttl)

    def get(self, tenant_id: str) -> common_pb2.RateLimits | None:
        return self._cache.get(tenant_id)

    def now(self, tenant_id: str) -> common_pb2.RateLimits | None:
        """As cached, never waiting on a read (see `Functions.now`)."""
        return self._cache.get_nowait(tenant_id)

    def _fetch(self, tenant_id: str) -> common_pb2.RateLimits | None:
        tenant = self._store.get_tenant(tenant_id)
        return tenant.rate_limits if tenant is not None else None


class UnreadBacklog:
    """Tasks still on Kafka, unread, by tenant — estimated, since records are read in order:
    each owned partition's unread records (refreshed every `UNREAD_SECONDS`) times its recent
    tasks per record, shared among tenants as their tasks were among its recent records.
    Fast tasks pile up there rather than in memory, so admission needs it."""

    DECAY_AT = 5000  # tasks seen per partition before the mix halves: recent ones count

    def __init__(self) -> None:
        self._mix: dict[PartitionId, Counter[str]] = {}
        self._per_record: dict[PartitionId, float] = {}
        self._unread: dict[PartitionId, int] = {}
        self._lock = threading.Lock()

    def seen(self, partition: PartitionId, tenants: Counter[str]) -> None:
        """A record of the partition was read with these tasks per tenant."""
        tasks = tenants.total()
        with self._lock:
            mix = self._mix.setdefault(partition, Counter())
            mix.update(tenants)
            if mix.total() > self.DECAY_AT:
                for tenant in list(mix):
                    mix[tenant] //= 2
                    if not mix[tenant]:
                        del mix[tenant]
            before = self._per_record.get(partition, float(tasks))
            self._per_record[partition] = 0.9 * before + 0.1 * tasks

    def set_unread(self, unread: dict[PartitionId, int]) -> None:
        with self._lock:
            self._unread = dict(unread)
            for partition in set(self._mix) - set(unread):
                del self._mix[partition]  # no longer ours
                self._per_record.pop(partition, None)

    def records(self) -> dict[PartitionId, int]:
        """Unread records per owned partition, as last counted (zeros included)."""
        with self._lock:
            return dict(self._unread)

    def by_partition(self) -> dict[PartitionId, int]:
        with self._lock:
            return {p: round(records * self._per_record.get(p, 1.0))
                    for p, records in self._unread.items() if records}

    def by_tenant(self) -> dict[str, int]:
        estimate: Counter[str] = Counter()
        with self._lock:
            for partition, records in self._unread.items():
                mix = self._mix.get(partition)
                if not records or not mix:
                    continue
                tasks = records * self._per_record[partition]
                total = mix.total()
                for tenant, count in mix.items():
                    estimate[tenant] += round(tasks * count / total)
        return {t: n for t, n in estimate.items() if n > 0}


@dataclass
class _Pending:
    """A record's task waiting its turn in its partition's queue."""

    message: records_pb2.TaskMessage
    ack: RecordAck
    read: Future | None = None  # the task's stored state, when it is needed


class Intake:
    """Hands consumed records to the owner, in offset order per partition."""

    def __init__(self, *, owner: Owner, tasks: TaskStateStore, functions: Functions,
                 tenants: TenantLimits | None = None, unread: UnreadBacklog | None = None
                 ) -> None:
        self._owner = owner
        self._unread = unread
        self._tasks = tasks
        self._functions = functions
        self._tenants = tenants
        self._queues: dict[PartitionId, deque[_Pending]] = {}
        # The highest offset offered per partition: a record at or below it comes again after
        # a rewind, and its task may have finished since, so its state is read first.
        self._offered: dict[PartitionId, int] = {}
        self._lock = threading.Lock()
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")

    def offer(self, message: Message) -> None:
        """One Kafka record (a batch of tasks or control records) of an owned partition."""
        batch = records_pb2.TaskMessageBatch.FromString(message.value)
        partition = (message.topic, message.partition)
        if not self._owner.ready(partition):
            # Fetched in the poll that assigned the partition, before it was paused for its
            # adoption: rewound, it comes again once the partition is adopted.
            message.nack()
            return
        with self._lock:
            again = message.offset <= self._offered.get(partition, -1)
            self._offered[partition] = max(message.offset, self._offered.get(partition, -1))
        if not batch.tasks:
            message.ack()
            return
        if self._unread is not None:
            self._unread.seen(partition, Counter(task.tenant_id for task in batch.tasks))
        ack = RecordAck(message.ack, len(batch.tasks), message.nack)
        replaying = again or self._owner.replaying(partition, message.offset)
        items = []
        for task in batch.tasks:
            key = TaskKey(task.tenant_id, task.task_id)
            # A control record is always checked against the stored task: one the owner holds
            # now may be written and let go before the record is taken.
            needs_state = replaying or task.check_state or bool(task.kind)
            read = resolve(self._tasks.read_async(key)) if needs_state else None
            self._functions.get(task.tenant_id, task.function)  # warm, outside the lock
            if self._tenants is not None:
                self._tenants.get(task.tenant_id)
            items.append(_Pending(task, ack, read))
        with self._lock:
            self._queues.setdefault(partition, deque()).extend(items)
        # Every take happens on the one intake thread, so a partition's records stay in order.
        for item in items:
            if item.read is not None:
                item.read.add_done_callback(lambda _f: self._reads.submit(self.drain, partition))
        self._reads.submit(self.drain, partition)

    def drain(self, partition: PartitionId) -> None:
        """Takes the partition's records from the head while their reads are done."""
        while True:
            with self._lock:
                queue = self._queues.get(partition)
                if not queue or (queue[0].read is not None and not queue[0].read.done()):
                    return
                item = queue.popleft()
            task = item.message
            function = self._functions.get(task.tenant_id, task.function)
            if item.read is None:
                taken = self._owner.take(partition, task, function, item.ack)
            else:
                try:
                    stored = TaskStateStore.stored_of(item.read.result())
                except Exception:
                    log.exception("could not read a task's state; its record comes again",
                                  extra={"task_id": task.task_id})
                    item.ack.nack()
                    self.forget(partition)
                    return
                taken = self._owner.take(partition, task, function, item.ack, stored,
                                         checked=True)
            if not taken:  # the partition is no longer ours: its next owner replays it
                item.ack.nack()
                self.forget(partition)
                return

    def forget(self, partition: PartitionId) -> None:
        with self._lock:
            self._queues.pop(partition, None)


class Adoption:
    """What happens when the group assigns a partition: epoch, adoption, timers, go."""

    def __init__(self, *, owner: Owner, owners: PartitionOwners, index: PartitionIndex,
                 tasks: TaskStateStore, functions: Functions, timers: TimerWheel,
                 owner_name: str, lease: timedelta,
                 resume: Callable[[set[TopicPartition]], None]) -> None:
        self._owner = owner
        self._owners = owners
        self._index = index
        self._tasks = tasks
        self._functions = functions
        self._timers = timers
        self._name = owner_name
        self._lease = lease
        self._resume = resume
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adoption")
        # A partition can be assigned, revoked and assigned again while an adoption runs:
        # only the latest assignment's adoption may finish, one at a time per partition.
        self._generations: dict[PartitionId, int] = {}
        self._locks: dict[PartitionId, threading.Lock] = {}
        self._guard = threading.Lock()

    def start(self, tp: TopicPartition, replay_below: int) -> None:
        generation = self._bump((tp.topic, tp.partition))
        self._pool.submit(self._adopt, tp, replay_below, generation)

    def cancel(self, tp: TopicPartition) -> None:
        """The partition was revoked: an adoption of it still running stops."""
        self._bump((tp.topic, tp.partition))

    def _bump(self, partition: PartitionId) -> int:
        with self._guard:
            self._generations[partition] = self._generations.get(partition, 0) + 1
            self._locks.setdefault(partition, threading.Lock())
            return self._generations[partition]

    def _current(self, partition: PartitionId, generation: int) -> bool:
        with self._guard:
            return self._generations.get(partition) == generation

    def _adopt(self, tp: TopicPartition, replay_below: int, generation: int) -> None:
        partition = (tp.topic, tp.partition)
        with self._locks[partition]:
            if self._current(partition, generation):
                self._adopt_now(tp, replay_below, generation)

    def _adopt_now(self, tp: TopicPartition, replay_below: int, generation: int) -> None:
        partition = (tp.topic, tp.partition)
        for attempt in itertools.count(1):
            if not self._current(partition, generation):
                return  # revoked, or assigned again: that assignment adopts it
            try:
                previous = self._owners.current(tp.topic, tp.partition)
                ownership = self._owners.acquire(tp.topic, tp.partition, self._name)
                self._owner.own(ownership, replay_below=replay_below)
                found = self._inflight(partition, previous)
                self._owner.adopt(partition, found, self._functions.get)
                self._timers.load(ownership, previous)
                if not self._current(partition, generation):
                    self._owner.disown(partition)
                    return
                self._owner.adopted(partition)
                log.info("partition adopted", extra={
                    "partition": f"{tp.topic}/{tp.partition}", "epoch": ownership.epoch,
                    "adopted_attempts": len(found), "replay_below": replay_below})
                self._resume({tp})
                return
            except Exception:
                log.exception("could not adopt a partition; trying again",
                              extra={"partition": f"{tp.topic}/{tp.partition}"})
                self._owner.disown(partition)
                time.sleep(min(0.2 * attempt, 5.0))

    def _inflight(self, partition: PartitionId,
                  previous: tuple[int, int] | None) -> list[StoredTask]:
        """The attempts the previous owners left out at executors (by their lease minute)."""
        now = now_utc()
        if previous is None:
            return []
        range_start, range_end = previous
        # It stopped writing at most a range before its range's end.
        start = datetime.fromtimestamp(range_end / 1e6, UTC) - RANGE - MINUTE
        end = max(now, datetime.fromtimestamp(range_end / 1e6, UTC)) + self._lease + MINUTE
        keys = set()
        minute = minute_of(min(start, now))
        while minute <= end:
            for entry in self._index.inflight(partition[0], partition[1], minute):
                keys.add(TaskKey(entry.tenant_id, entry.task_id))
            minute += MINUTE
        return [s for s in self._tasks.get_many(sorted(keys, key=lambda k: k.task_id),
                                                history=True) if s is not None]


class TimerWheel:
    """Fires the owned partitions' timers at their due time.

    Each partition's timers are read from `partition_timers` a minute ahead (and, at
    assignment, from the minute its last owner had not finished); timers this owner writes
    for the near future join in memory as soon as they are durable.
    """

    def __init__(self, *, owner: Owner, index: PartitionIndex, tasks: TaskStateStore,
                 owners: PartitionOwners, functions: Functions) -> None:
        self._owner = owner
        self._index = index
        self._tasks = tasks
        self._owners = owners
        self._functions = functions
        self._heap: list[tuple[datetime, int, PartitionId, Timer]] = []
        self._known: set[tuple[PartitionId, Timer]] = set()
        self._loaded: dict[PartitionId, datetime] = {}  # minutes read up to (inclusive)
        self._cursor: dict[PartitionId, datetime] = {}  # first minute not all fired
        self._seq = itertools.count()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
        self._fire_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="timer-fire")

    def start(self) -> TimerWheel:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(5)

    def load(self, ownership: Ownership, previous: tuple[int, int] | None) -> None:
        """Starts firing a partition's timers: from its cursor, and from the minute its last
        owner may have stopped firing (its range's end, less a range) whatever the cursor
        says; never past the current minute, or timers due now would be skipped."""
        partition = (ownership.topic, ownership.partition)
        now = minute_of(now_utc())
        first = ownership.timer_minute or now
        if previous is not None:
            stopped = datetime.fromtimestamp(previous[1] / 1e6, UTC) - RANGE - TIMER_MARGIN
            first = min(first, minute_of(stopped))
        first = min(first, now)
        with self._lock:
            self._cursor[partition] = first
            self._loaded.pop(partition, None)
        self._read_ahead(partition)

    def add(self, partition: PartitionId, timers: Iterable[Timer]) -> None:
        """Timers this owner wrote: those due before what was read ahead join in memory."""
        with self._lock:
            horizon = self._loaded.get(partition)
            for timer in timers:
                if horizon is not None and minute_of(timer.due_time) <= horizon:
                    self._push(partition, timer)
            self._lock.notify_all()

    def _push(self, partition: PartitionId, timer: Timer) -> None:
        if (partition, timer) in self._known:
            return
        self._known.add((partition, timer))
        heapq.heappush(self._heap, (timer.due_time, next(self._seq), partition, timer))

    def _read_ahead(self, partition: PartitionId) -> None:
        """Reads the partition's minutes up to the next one."""
        horizon = minute_of(now_utc()) + MINUTE
        with self._lock:
            start = self._loaded.get(partition)
            start = start + MINUTE if start else self._cursor.get(partition)
        if start is None:
            return
        minute = start
        found: list[Timer] = []
        while minute <= horizon:
            found += self._index.timers(partition[0], partition[1], minute)
            minute += MINUTE
        with self._lock:
            if partition not in self._cursor:
                return
            for timer in found:
                self._push(partition, timer)
            self._loaded[partition] = horizon
            self._lock.notify_all()

    def _run(self) -> None:
        next_read = 0.0
        while True:
            with self._lock:
                if self._stopping:
                    return
                owned = set(self._owner.owned())
                for partition in list(self._cursor):
                    if partition not in owned and partition not in {
                            (o.topic, o.partition) for o in self._owner.ownerships()}:
                        self._drop(partition)
                due: list[tuple[PartitionId, Timer]] = []
                now = now_utc()
                while self._heap and self._heap[0][0] <= now:
                    _, _, partition, timer = heapq.heappop(self._heap)
                    if partition in self._cursor:
                        due.append((partition, timer))
                wait = (self._heap[0][0] - now).total_seconds() if self._heap else 1.0
            for partition, timer in due:
                self._fire_pool.submit(self._fire, partition, timer)
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + 5.0
                for partition in list(self._cursor):
                    try:
                        self._read_ahead(partition)
                        self._advance(partition)
                    except Exception:
                        log.exception("could not read timers", extra={"partition": partition})
            with self._lock:
                if not self._stopping:
                    self._lock.wait(max(0.0, min(wait, 1.0)))

    def _fire(self, partition: PartitionId, timer: Timer) -> None:
        try:
            stored = self._tasks.get([TaskKey(timer.tenant_id, timer.task_id)][0])
            function = self._functions.get(timer.tenant_id, stored.spec.task.function) \
                if stored else None
            self._owner.fire(partition, timer, stored, function)
        except Exception:
            log.exception("a timer could not fire; it is tried again",
                          extra={"task_id": timer.task_id})
            with self._lock:
                heapq.heappush(self._heap, (now_utc() + timedelta(seconds=1), next(self._seq),
                                            partition, timer))
            return
        with self._lock:
            self._known.discard((partition, timer))

    def _advance(self, partition: PartitionId) -> None:
        """Moves the partition's cursor past minutes whose timers all fired."""
        with self._lock:
            cursor = self._cursor.get(partition)
            if cursor is None:
                return
            pending = [t.due_time for p, t in self._known if p == partition]
            limit = minute_of(now_utc() - TIMER_MARGIN)
            target = min([minute_of(d) for d in pending] + [limit])
        if target <= cursor:
            return
        stamp = self._owner.stamp(partition)
        ownership = next((o for o in self._owner.ownerships()
                          if (o.topic, o.partition) == partition), None)
        if stamp is None or ownership is None:
            return
        self._owners.advance_timers(ownership, target, stamp)
        with self._lock:
            if partition in self._cursor:
                self._cursor[partition] = target

    def _drop(self, partition: PartitionId) -> None:
        self._cursor.pop(partition, None)
        self._loaded.pop(partition, None)
        self._known = {(p, t) for p, t in self._known if p != partition}


class Publisher:
    """Puts flushed outcomes on the results topic, few records per flush; queues parked
    tasks again when their function turned out active after all."""

    def __init__(self, producer: Producer, topic: str, partitions: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self._turn = itertools.count()
        self._give_up_at = float("inf")  # monotonic; set when closing

    def close(self, grace_seconds: float) -> None:
        """Outcomes not published within ``grace_seconds`` from now are given up."""
        self._give_up_at = time.monotonic() + grace_seconds

    def requeue(self, messages: list[tuple[PartitionId, records_pb2.TaskMessage]]) -> None:
        """Produces messages again on their partitions, asking their owner to check the
        stored state first (another copy may have been released by a resume too)."""
        routed = []
        for (topic, partition), message in messages:
            again = records_pb2.TaskMessage()
            again.CopyFrom(message)
            again.check_state = True
            routed.append((topic, partition, again))
        self.producer.send_all(records_by_partition(routed))

    def publish(self, outcomes: list[records_pb2.AttemptOutcome]) -> None:
        """Tried until Kafka takes them (their state is stored already): a broker outage
        delays webhooks and watchers, it does not drop them."""
        if not outcomes:
            return
        partition = next(self._turn) % self.partitions
        records = [Record(self.topic, records_pb2.AttemptOutcomeBatch(
            outcomes=chunk).SerializeToString(), partition=partition)
            for chunk in chunks_by_size(outcomes, MAX_RECORD_BYTES)]
        failures = 0
        start_ns = time.time_ns()
        while True:
            try:
                self.producer.send_all(records)
                end_ns = time.time_ns()
                for outcome in outcomes:
                    tracing.record(outcome.trace_context, "kafka.produce", start_ns, end_ns,
                                   attributes={"messaging.destination.name": self.topic},
                                   kind=SpanKind.PRODUCER)
                return
            except Exception:
                failures += 1
                if time.monotonic() >= self._give_up_at:
                    log.error("outcomes not published (their state is stored)",
                              extra={"outcomes": len(outcomes)})
                    return
                log.warning("could not publish outcomes; trying again", exc_info=failures == 1)
                time.sleep(min(0.2 * failures, 2.0))


class Flusher:
    """Writes the owner's changes in batches, every few milliseconds."""

    def __init__(self, *, owner: Owner, tasks: TaskStateStore, index: PartitionIndex,
                 owners: PartitionOwners, dead_letters: DeadLetterStore, parked: ParkedStore,
                 timers: TimerWheel, publisher: Publisher, functions: Functions,
                 attempt_logs: AttemptLogWriter | None = None,
                 metrics: DispatcherMetrics | None = None) -> None:
        self._owner = owner
        self._attempt_logs = attempt_logs
        self._metrics = metrics
        self._functions = functions
        self._tasks = tasks
        self._index = index
        self._owners = owners
        self._dead_letters = dead_letters
        self._parked = parked
        self._timers = timers
        self._publisher = publisher
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._verified_at = 0.0
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        self._publishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        owner.on_dirty(self._wake.set)

    def start(self) -> Flusher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Flushes what is pending, then stops."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(10)
        self._publisher.close(grace_seconds=5)
        self._publishing.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            self._wake.wait(0.05)
            stopping = self._stopping.is_set()
            time.sleep(FLUSH_SECONDS)
            self._wake.clear()
            self._owner.tick()
            try:
                self._renew()
                self.flush_once()
            except Exception:
                log.exception("a flush failed; trying again")
                time.sleep(0.2)
                continue
            if stopping:
                return

    def _renew(self) -> None:
        for ownership in self._owner.needs_renewal():
            try:
                self._owner.renewed(self._owners.renew(ownership))
            except OwnershipLost:
                log.warning("partition taken over", extra={
                    "partition": f"{ownership.topic}/{ownership.partition}"})
                self._owner.disown((ownership.topic, ownership.partition))

    def _verify(self, force: bool = False) -> None:
        """Re-reads our epochs (a zombie that was paused must learn it lost them before it
        writes); at most every VERIFY_SECONDS of the monotonic clock."""
        if not force and time.monotonic() - self._verified_at < VERIFY_SECONDS:
            return
        mine = self._owner.ownerships()
        for topic in {o.topic for o in mine}:
            epochs = self._owners.epochs(topic)
            for ownership in mine:
                if ownership.topic == topic and epochs.get(ownership.partition) != \
                        ownership.epoch:
                    log.warning("partition taken over", extra={
                        "partition": f"{topic}/{ownership.partition}"})
                    self._owner.disown((topic, ownership.partition))
        self._verified_at = time.monotonic()

    def flush_once(self) -> bool:
        """One batch: written (retried until it is), then confirmed. True if any."""
        if not self._owner.has_changes():
            return False
        self._verify()  # before a zombie's first write after it was paused
        batch = self._owner.collect()
        if not batch.held:
            return False
        delay = 0.05
        write_ns = time.time_ns()
        while True:
            try:
                self._write(batch)
                break
            except Exception:
                log.warning("writing a flush failed; trying it again", exc_info=True)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:  # the batch is collected: it is written or given up, never dropped
                    self._verify(force=True)
                except Exception:
                    log.warning("could not check our epochs; trying again", exc_info=True)
        outcomes = self._owner.flushed(batch)
        _trace_write(outcomes, write_ns, len(batch.writes))
        if self._metrics is not None:  # here, off the owner's lock, once per batch
            try:
                self._metrics.outcomes(outcomes)
                self._metrics.dead_lettered(batch.dead_letters)
            except Exception:  # never at the cost of publishing them
                log.exception("could not count a flush's outcomes")
        for partition, timers in batch.timers.items():
            self._timers.add(partition, timers)
        if batch.parked:  # after `flushed`: a task queued again must find none held
            self._unpark_if_resumed(batch.parked)
        self._publishing.submit(self._publisher.publish, outcomes)
        return True

    def _write(self, batch: FlushBatch) -> None:
        futures = [self._tasks.write(w) for w in batch.writes]
        for (topic, partition, minute), entries in batch.inflight.items():
            futures.append(self._index.add_inflight(
                topic, partition, minute, entries, batch.inflight_stamps[(topic, partition,
                                                                          minute)]))
        for (topic, partition), timers in batch.timers.items():
            futures += self._index.add_timers(topic, partition, timers,
                                              batch.timer_stamps[(topic, partition)])
        for _, message in batch.parked:
            self._parked.park(message)
        for stored in batch.dead_letters:
            self._dead_letters.put(stored, when=now_utc())
        if self._attempt_logs is not None:
            # Beside the tasks' writes, not after them: no extra round trip; stored before the
            # executors hear their reports are durable (so they stop sending them again).
            futures += [self._attempt_logs.write(log, timestamp=stamp)
                        for log, stamp in batch.logs]
        for future in futures:
            future.result()

    def _unpark_if_resumed(self, parked: list[tuple[PartitionId, records_pb2.TaskMessage]]
                           ) -> None:
        """Parks are written before the function is read afresh, and ResumeFunction writes
        ACTIVE before it reads the parks: so either the resume sees a park, or this read
        sees the resume and the task is queued again here. None is stranded."""
        active = []
        for partition, message in parked:
            function = self._functions.fresh(message.tenant_id, message.function)
            if function is not None and function.state not in HELD:
                active.append((partition, message))
        if active:
            self._publisher.requeue(active)
            for _, message in active:
                self._parked.unpark(message)


def _trace_write(outcomes: list[records_pb2.AttemptOutcome], start_ns: int, writes: int
                 ) -> None:
    """The flush that stored these outcomes, in each sampled task's trace."""
    end_ns = time.time_ns()
    for outcome in outcomes:
        tracing.record(outcome.trace_context, "cassandra.write", start_ns, end_ns,
                       attributes={"weir.state": outcome.state, "weir.writes": writes},
                       kind=SpanKind.CLIENT)


def backlogged(waiting: dict[PartitionId, int], owned: Iterable[PartitionId]
               ) -> set[PartitionId]:
    """The owned partitions to stop reading: their own waiting tasks, or their topic's (one
    priority tier), at the limit."""
    by_topic: dict[str, int] = {}
    for (topic, _), count in waiting.items():
        by_topic[topic] = by_topic.get(topic, 0) + count
    return {p for p in owned
            if waiting.get(p, 0) >= PARTITION_LIMIT or by_topic.get(p[0], 0) >= TIER_LIMIT}


class PartitionConsumer:
    """The consumer group side: assignment and revocation, pausing what is not adopted yet
    or while the ready queue is full, all on the consumer's own thread."""

    def __init__(self, *, owner: Owner, intake: Intake,
                 unread: UnreadBacklog | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._owner = owner
        self._intake = intake
        self._unread = unread
        self._clock = clock
        self._unread_at = -UNREAD_SECONDS
        self._checked_at = -PAUSE_CHECK_SECONDS
        self._adoption: Adoption | None = None
        self._consumer: Consumer | None = None
        self._commands: deque[Callable[[], None]] = deque()
        self._paused_for_backlog: set[TopicPartition] = set()

    def bind(self, consumer: Consumer, adoption: Adoption) -> None:
        self._consumer = consumer
        self._adoption = adoption

    def assigned(self, partitions: set[TopicPartition]) -> None:
        """On kafka-python's IO thread: only queue work for the consumer thread."""
        self._commands.append(lambda: self._take_over(partitions))

    def revoked(self, partitions: set[TopicPartition]) -> None:
        # Assigned again, they start from scratch (on the consumer thread, like `between`).
        self._commands.append(lambda: self._paused_for_backlog.difference_update(partitions))
        for tp in partitions:
            if self._adoption is not None:
                self._adoption.cancel(tp)
            self._owner.disown((tp.topic, tp.partition))
            self._intake.forget((tp.topic, tp.partition))

    def resume(self, partitions: set[TopicPartition]) -> None:
        self._commands.append(lambda: self._consumer.resume(partitions)
                              if self._consumer else None)

    def between(self) -> None:
        """Runs on the consumer thread before each poll."""
        while self._commands:
            self._commands.popleft()()
        assert self._consumer is not None
        now = self._clock()
        if now - self._checked_at < PAUSE_CHECK_SECONDS:
            return  # polls come often; the piles they watch change slowly
        self._checked_at = now
        ours = self._owner.owned()
        owned = {TopicPartition(t, p) for t, p in ours}
        pause = {TopicPartition(t, p) for t, p in backlogged(self._owner.waiting(), ours)}
        if pause - self._paused_for_backlog:
            self._consumer.pause(pause - self._paused_for_backlog)
        resume = (self._paused_for_backlog & owned) - pause
        if resume:
            self._consumer.resume(resume)
        self._paused_for_backlog = pause
        if self._unread is not None and self._clock() - self._unread_at >= UNREAD_SECONDS:
            self._unread_at = self._clock()
            try:
                unread = self._consumer.unread(owned)
            except Exception:  # a broker away or a rebalance: an estimate, never a reason to stop
                log.warning("cannot count the unread records", exc_info=True)
            else:
                self._unread.set_unread({(tp.topic, tp.partition): n
                                         for tp, n in unread.items()})

    def _take_over(self, partitions: set[TopicPartition]) -> None:
        assert self._consumer is not None and self._adoption is not None
        self._consumer.pause(partitions)
        ends = self._consumer.end_offsets(partitions)
        for tp in partitions:
            self._adoption.start(tp, ends.get(tp, 0))


class LimitSync:
    """Renews this dispatcher's shares of the cluster-wide limits at the router, and reports
    its backlog by tenant: every `SHARE_SECONDS`, and at once when a limited function waits
    for its first share (or a share shrank or idles). `step` runs every few milliseconds
    (`libs.periodic.Periodic`); `Owner.pace`, on a thread of its own, lets out the tasks a
    rate held back as its tokens come."""

    def __init__(self, *, owner: Owner, router: router_pb2_grpc.RouterServiceStub,
                 dispatcher_id: str, unread: UnreadBacklog | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._owner = owner
        self._unread = unread
        self._router = router
        self._id = dispatcher_id
        self._clock = clock
        self._last = -SHARE_SECONDS
        self._complained = -ROUTER_COMPLAINT_SECONDS
        self._had_news = False

    def step(self) -> None:
        now = self._clock()
        if now - self._last < SHARE_SECONDS and not self._owner.limits_wanted():
            return
        self._last = now
        demands = self._owner.limit_demands()
        waiting = Counter(self._owner.backlog())
        by_partition = Counter(self._owner.partition_backlog())
        if self._unread is not None:
            waiting.update(self._unread.by_tenant())
            by_partition.update(self._unread.by_partition())
        backlog = heapq.nlargest(MAX_BACKLOG_TENANTS, waiting.items(), key=lambda item: item[1])
        partitions = heapq.nlargest(MAX_BACKLOG_TENANTS, (
            item for item in by_partition.items() if item[1] > 0), key=lambda item: item[1])
        if not demands and not backlog and not partitions and not self._had_news:
            return  # (an empty report once after the last, so the router frees what we held)
        self._had_news = bool(demands or backlog or partitions)
        try:
            response = self._router.ShareLimits(router_pb2.ShareLimitsRequest(
                dispatcher_id=self._id, demands=demands, backlogs=[
                    router_pb2.TenantBacklog(tenant_id=t, waiting=n) for t, n in backlog],
                partition_backlogs=[
                    router_pb2.PartitionBacklog(topic=topic, partition=p, waiting=n)
                    for (topic, p), n in partitions]),
                timeout=SHARE_SECONDS * 4)
        except grpc.RpcError as exc:
            # Shares run out on their own: limited functions wait; the rest flow on.
            if now - self._complained >= ROUTER_COMPLAINT_SECONDS:
                self._complained = now
                log.warning("cannot renew the limit shares at the router", extra={
                    "code": exc.code().name if exc.code() else "", "detail": exc.details()})
            return
        self._owner.share_limits(list(response.shares),
                                 lease=response.lease.ToTimedelta().total_seconds())
