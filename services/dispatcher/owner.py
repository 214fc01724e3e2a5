"""The partition owner: the one writer of the tasks of the Kafka partitions it owns.

`Owner` holds, in memory and under one lock, what this dispatcher is doing with its tasks:
those waiting for an executor's credit (the ready queue), those out at an executor (with
their lease), and every change not yet written. Nothing here does I/O: the dispatcher's
threads feed it records, state reads, credits, reports and clock ticks, and `collect` hands
the flusher one batch of writes — one per changed task — whose success `flushed` confirms.
See docs/architecture.md, "The task path".
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2
from opentelemetry.trace import Span, SpanKind
from weir.internal.dispatcher.v1 import dispatcher_pb2
from weir.internal.router.v1 import router_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import logs, tracing
from libs.batching import BATCH_BYTES, chunks_by_size
from libs.cassandra.attempt_logs import AttemptLogWrite
from libs.cassandra.owners import Ownership, TimestampRange
from libs.cassandra.partition_index import InflightEntry, Timer, minute_of, to_millis
from libs.cassandra.taskstate import (
    FINAL_STATES,
    StoredTask,
    TaskKey,
    TaskWrite,
    micros,
    now_utc,
    timestamp_of,
)
from libs.function_defaults import DEFAULT_TIMEOUT, DEFAULT_WORKER_CONCURRENCY
from libs.kafka.acks import Countdown
from libs.retry import RetryPolicy, decide
from services.dispatcher.limits import Limiter, LimitKey, tier_quotas
from services.dispatcher.metrics import DispatcherMetrics

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
Exit = tasks_pb2.ExitReason
ErrorClass = common_pb2.ErrorClass
Kind = records_pb2.MessageKind
TimerKind = records_pb2.TimerKind
HELD = frozenset({functions_pb2.FunctionState.FUNCTION_STATE_PAUSED,
                  functions_pb2.FunctionState.FUNCTION_STATE_DELETING})
WAITING = frozenset({State.TASK_STATE_ACCEPTED, State.TASK_STATE_QUEUED,
                     State.TASK_STATE_SCHEDULED, State.TASK_STATE_RETRY_WAIT})
OUT = frozenset({State.TASK_STATE_DISPATCHED, State.TASK_STATE_RUNNING})
HIGH = common_pb2.Priority.PRIORITY_HIGH
TIERS: tuple[int, ...] = (common_pb2.Priority.PRIORITY_HIGH, common_pb2.Priority.PRIORITY_NORMAL,
         common_pb2.Priority.PRIORITY_LOW)
# Each lower tier's minimum share of the dispatches while a higher tier waits too.
DEFAULT_SHARES: dict[int, float] = {common_pb2.Priority.PRIORITY_NORMAL: 0.2,
                                    common_pb2.Priority.PRIORITY_LOW: 0.1}
SERVICE = "dispatcher"
# An attempt is written once it has been out this long, or when it ends if sooner: a short
# task costs one write for dispatch, start and end together. A crash before the write
# replays its record (not yet acknowledged) and runs it again: at least once, as always.
PERSIST_AFTER = timedelta(milliseconds=100)
EXECUTOR = "executor-manager"  # what an executor reported is its stage, written here

PartitionId = tuple[str, int]
# (tenant, function name, what to assume when nothing is cached) -> the function now.
FunctionsNow = Callable[[str, str, functions_pb2.Function | None], functions_pb2.Function | None]


class RecordAck(Countdown):
    """Acknowledges a Kafka record once each of its tasks has had its first durable write."""

    def __init__(self, ack: Callable[[], None], count: int,
                 nack: Callable[[], None] = lambda: None) -> None:
        super().__init__(count, ack)
        self._nack = nack

    def done(self) -> None:
        self.tick()

    def nack(self) -> None:
        """The record must come again (its partition changed hands mid-way): once."""
        with self._lock:
            if self._left <= 0:
                return
            self._left = 0
        self._nack()


@dataclass
class Held:
    """A task the owner holds: waiting for a slot, out at an executor, or with a change not
    yet written. Dropped from memory once it is written in a state it can wait in alone."""

    key: TaskKey
    partition: PartitionId
    message: records_pb2.TaskMessage  # function, payload, priority, labels, expiry...
    function: functions_pb2.Function | None
    state: State
    status: records_pb2.TaskStatus
    floor: int  # microseconds: every write of it comes after its creation
    due: float = 0.0  # wall-clock seconds: since when it waits to run (queue time: metrics, trace)
    history: records_pb2.TaskHistory = field(default_factory=records_pb2.TaskHistory)
    dirty: bool = False
    result: bytes | None = None
    payload_override: bytes | None = None
    attempt: tasks_pb2.Attempt | None = None  # the attempt out now
    executor: str = ""
    lease_deadline: float = 0.0  # monotonic
    out_since: float | None = None  # monotonic; set while its dispatch is not yet written
    persisted_lease: datetime | None = None
    acks: list[RecordAck] = field(default_factory=list)
    release: bool = False  # drop from memory after the next flush
    timers: list[Timer] = field(default_factory=list)
    dead_letter: bool = False
    park: bool = False
    outcome: records_pb2.AttemptOutcome | None = None
    reports: list[tuple[Stream, str]] = field(default_factory=list)  # to confirm once stored
    earlier: list[tasks_pb2.Attempt] = field(default_factory=list)  # stored attempts
    out_keys: list[LimitKey] = field(default_factory=list)  # counted out under these
    span: Span | None = None  # the attempt out now, when the task's trace is sampled
    logs: list[AttemptLogWrite] = field(default_factory=list)  # to write with the next flush

    @property
    def payload(self) -> bytes:
        return self.message.payload if self.payload_override is None else self.payload_override


@dataclass
class Stream:
    """An executor-manager's Work stream, as the owner sees it."""

    executor_id: str
    wake: Callable[[], object]  # its result is ignored
    credits: int = 0
    below_high: int | None = None  # of the credits, what NORMAL and LOW may use (None: all)
    draining: bool = False
    assignments: list[dispatcher_pb2.Assignment] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    durable: list[str] = field(default_factory=list)
    owned_changed: bool = True

    def take(self, owned: list[tuple[PartitionId, int]]) -> dispatcher_pb2.WorkResponse | None:
        """What to send now, or None. ``owned``: the partitions held and their epochs."""
        if not (self.assignments or self.cancel or self.moved or self.stale or self.durable
                or self.owned_changed):
            return None
        # Assignments carry payloads: a message takes what fits, the rest go in the next.
        first, *later = chunks_by_size(self.assignments, BATCH_BYTES)
        response = dispatcher_pb2.WorkResponse(
            assignments=first, cancel=self.cancel, moved=self.moved,
            stale=self.stale, durable=self.durable)
        if self.owned_changed:
            response.owned_changed = True
            response.owned.extend(dispatcher_pb2.PartitionRef(topic=t, partition=p, epoch=e)
                                  for (t, p), e in owned)
        self.assignments = [a for chunk in later for a in chunk]
        self.cancel, self.moved, self.stale, self.durable = [], [], [], []
        self.owned_changed = False
        if self.assignments:
            self.wake()
        return response


@dataclass
class Partition:
    """A partition this owner holds, with its epoch's timestamps."""

    ownership: Ownership
    clock: TimestampRange
    replay_below: int  # offsets below were there at assignment: check their state first
    ready: bool = False  # adopted: its records may be taken


@dataclass
class FlushBatch:
    """One flush: the writes to make, and what to do once they are durable."""

    writes: list[TaskWrite] = field(default_factory=list)
    inflight: dict[tuple[str, int, datetime], list[InflightEntry]] = field(
        default_factory=dict)
    inflight_stamps: dict[tuple[str, int, datetime], int] = field(default_factory=dict)
    timers: dict[PartitionId, list[Timer]] = field(default_factory=dict)
    timer_stamps: dict[PartitionId, int] = field(default_factory=dict)
    dead_letters: list[StoredTask] = field(default_factory=list)
    parked: list[tuple[PartitionId, records_pb2.TaskMessage]] = field(default_factory=list)
    outcomes: list[tuple[PartitionId, records_pb2.AttemptOutcome]] = field(
        default_factory=list)
    held: list[Held] = field(default_factory=list)
    reports: list[tuple[Stream, str, PartitionId]] = field(default_factory=list)  # stored
    acks: list[RecordAck] = field(default_factory=list)  # records done once written
    epochs: dict[PartitionId, int] = field(default_factory=dict)  # the epochs it wrote under
    # Attempts' captured output, each at the write timestamp of its task's write.
    logs: list[tuple[AttemptLogWrite, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.writes or self.inflight or self.timers or self.logs)


class ReadyQueue:
    """Tasks waiting for a slot.

    Higher tiers go first, but while a higher tier waits too, each lower tier is owed its
    minimum share of the pops (`shares`, e.g. LOW 0.1: every tenth pop), so LOW never
    starves and HIGH still takes the rest. Within a tier, partitions take turns, so one
    tenant's flood on its partitions does not hold up the others. Tasks a limit holds back
    wait aside by the limit's key until `release`; they still count as waiting on their
    partition (`waiting`), which is what consuming pauses on.
    """

    def __init__(self, shares: Mapping[int, float] | None = None) -> None:
        self._tiers: dict[int, OrderedDict[PartitionId, deque[Held]]] = {
            t: OrderedDict() for t in TIERS}
        self._shares: dict[int, float] = dict(DEFAULT_SHARES if shares is None else shares)
        if sum(self._shares.values()) >= 1:
            raise ValueError(f"the lower tiers' shares add up to 1 or more: {self._shares}")
        self._owed: dict[int, float] = {t: 0.0 for t in TIERS}
        self._aside: dict[LimitKey, deque[Held]] = {}
        self._waiting: Counter[PartitionId] = Counter()
        self._tenants: Counter[str] = Counter()  # waiting, by tenant: the backlog reported
        self._count = 0

    def __len__(self) -> int:
        """Tasks ready to go (not those set aside)."""
        return self._count

    def push(self, held: Held) -> None:
        self._queue(held)
        self._count_in(held)

    def _queue(self, held: Held) -> None:
        tier = held.message.priority if held.message.priority in self._tiers else TIERS[1]
        self._tiers[tier].setdefault(held.partition, deque()).append(held)
        self._count += 1

    def pop(self, *, below_high: bool = True) -> Held | None:
        """The next task to go, by tier and then partition; ``below_high=False``: HIGH only
        (the executors have room for HIGH work alone)."""
        tier = self._next_tier(TIERS if below_high else TIERS[:1])
        if tier is None:
            return None
        queues = self._tiers[tier]
        while queues:
            partition, queue = next(iter(queues.items()))
            queues.move_to_end(partition)
            if queue:
                self._count -= 1
                held = queue.popleft()
                self._uncount(held)
                return held
            del queues[partition]
        return None

    def _next_tier(self, allowed: tuple[int, ...]) -> int | None:
        """The highest waiting tier, unless a lower waiting tier has earned its turn.
        Shares count over every pop, those only ``allowed`` tiers could take too (HIGH into
        an executor's reserve): a lower tier catches up at its next chance."""
        waiting = [t for t in TIERS if any(self._tiers[t].values())]
        for tier in TIERS:
            if tier not in waiting:
                self._owed[tier] = 0.0  # no banking a share while idle
        candidates = [t for t in waiting if t in allowed]
        if not candidates:
            return None
        for tier in waiting[1:]:
            # Capped at 2, not 1: two tiers due at once both keep their turn.
            self._owed[tier] = min(2.0, self._owed[tier] + self._shares.get(tier, 0.0))
        due = [t for t in candidates if t != waiting[0]
               and self._owed[t] >= 1.0 - 1e-9]  # 10 × 0.1 < 1.0
        if not due:
            return candidates[0]
        tier = max(due, key=lambda t: self._owed[t])
        self._owed[tier] -= 1.0
        return tier

    def remove(self, held: Held) -> bool:
        for queues in self._tiers.values():
            queue = queues.get(held.partition)
            if queue is not None and held in queue:
                queue.remove(held)
                self._count -= 1
                self._uncount(held)
                return True
        return False

    def set_aside(self, key: LimitKey, held: Held) -> None:
        """A popped task that a limit holds back: it waits under ``key``."""
        self._aside.setdefault(key, deque()).append(held)
        self._count_in(held)

    def release(self, key: LimitKey, count: int = 1) -> None:
        """Up to ``count`` tasks set aside under ``key`` become ready again, oldest first."""
        aside = self._aside.get(key)
        while aside and count > 0:
            self._queue(aside.popleft())
            count -= 1
        if aside is not None and not aside:
            del self._aside[key]

    def aside(self, key: LimitKey) -> int:
        return len(self._aside.get(key, ()))

    def aside_keys(self) -> list[LimitKey]:
        return list(self._aside)

    def waiting(self) -> dict[PartitionId, int]:
        """Tasks waiting per partition, ready or set aside."""
        return dict(self._waiting)

    def tenants(self) -> dict[str, int]:
        """Tasks waiting per tenant, ready or set aside."""
        return dict(self._tenants)

    def drop_partition(self, partition: PartitionId) -> list[Held]:
        dropped: list[Held] = []
        for queues in self._tiers.values():
            dropped += queues.pop(partition, deque())
        self._count -= len(dropped)
        for key, aside in list(self._aside.items()):
            kept = deque(h for h in aside if h.partition != partition)
            dropped += [h for h in aside if h.partition == partition]
            if kept:
                self._aside[key] = kept
            else:
                del self._aside[key]
        self._waiting.pop(partition, None)
        for held in dropped:
            self._uncount_tenant(held.key.tenant_id)
        return dropped

    def _count_in(self, held: Held) -> None:
        self._waiting[held.partition] += 1
        self._tenants[held.key.tenant_id] += 1

    def _uncount(self, held: Held) -> None:
        self._waiting[held.partition] -= 1
        if self._waiting[held.partition] <= 0:
            del self._waiting[held.partition]
        self._uncount_tenant(held.key.tenant_id)

    def _uncount_tenant(self, tenant_id: str) -> None:
        self._tenants[tenant_id] -= 1
        if self._tenants[tenant_id] <= 0:
            del self._tenants[tenant_id]


class Owner:
    """The tasks of every partition this dispatcher owns (one lock; no I/O inside)."""

    def __init__(self, *, lease: timedelta, dispatcher_id: str,
                 clock: Callable[[], float] = time.monotonic,
                 functions: FunctionsNow | None = None,
                 shares: Mapping[int, float] | None = None,
                 tenant_limits: Callable[[str], common_pb2.RateLimits | None] | None = None,
                 metrics: DispatcherMetrics | None = None) -> None:
        self._lease = lease
        # A tenant's limits over all its functions, as cached now (never waiting on a read).
        self._tenant_limits = tenant_limits or (lambda tenant_id: None)
        self._id = dispatcher_id
        self._clock = clock
        # A function as it is now (cached briefly), so a pause or a deletion also holds back
        # the tasks already waiting for a slot; without it, as it was when the task came.
        self._function_now = functions
        self._lock = threading.Lock()
        self._partitions: dict[PartitionId, Partition] = {}
        self._held: dict[TaskKey, Held] = {}
        self._attempts: dict[str, Held] = {}  # attempt id -> task out at an executor
        # Attempts out per (tenant, function), and per (tenant, "") for the tenant's own limits;
        # a function or tenant with limits dispatches within this dispatcher's share of them
        # (`Limiter`), and its tasks beyond it wait aside in the ready queue.
        self._out: dict[tuple[str, str], int] = {}
        self._limiter = Limiter(clock)
        self._ready = ReadyQueue(shares)
        self._dirty: dict[TaskKey, Held] = {}
        self._streams: dict[int, Stream] = {}
        self._attempt_ids = itertools.count(1)
        self._wake_flusher: Callable[[], None] = lambda: None
        self._metrics = metrics

    def on_dirty(self, wake: Callable[[], None]) -> None:
        self._wake_flusher = wake

    # --- partitions ------------------------------------------------------------------------

    def own(self, ownership: Ownership, *, replay_below: int) -> None:
        with self._lock:
            self._partitions[(ownership.topic, ownership.partition)] = Partition(
                ownership, TimestampRange(ownership), replay_below)

    def adopted(self, partition: PartitionId) -> None:
        """The partition's in-flight attempts are adopted: its records may be taken."""
        with self._lock:
            if partition in self._partitions:
                self._partitions[partition].ready = True
            self._announce()

    def disown(self, partition: PartitionId) -> None:
        """Stops writing for a partition (revoked, or taken over): forgets its tasks."""
        with self._lock:
            if self._partitions.pop(partition, None) is None:
                return
            self._ready.drop_partition(partition)
            for held in list(self._held.values()):
                if held.partition == partition:
                    self._forget(held)
            self._announce()

    def owned(self) -> list[PartitionId]:
        with self._lock:
            return sorted(p for p, state in self._partitions.items() if state.ready)

    def ownerships(self) -> list[Ownership]:
        with self._lock:
            return [p.ownership for p in self._partitions.values()]

    def renewed(self, ownership: Ownership) -> None:
        with self._lock:
            partition = self._partitions.get((ownership.topic, ownership.partition))
            if partition and partition.ownership.epoch == ownership.epoch:
                partition.ownership = ownership
                partition.clock.extend(ownership)

    def needs_renewal(self) -> list[Ownership]:
        with self._lock:
            return [p.ownership for p in self._partitions.values() if p.clock.needs_renewal()]

    def replaying(self, partition: PartitionId, offset: int) -> bool:
        with self._lock:
            state = self._partitions.get(partition)
            return state is not None and offset < state.replay_below

    def stamp(self, partition: PartitionId) -> int | None:
        """A write timestamp of the partition's epoch (None when not ours, or used up)."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:
                return None
            try:
                return state.clock.next()
            except TimestampRange.Exhausted:
                return None

    def ready(self, partition: PartitionId) -> bool:
        """Whether the partition is owned and adopted: its records may be taken."""
        with self._lock:
            state = self._partitions.get(partition)
            return state is not None and state.ready

    def waiting(self) -> dict[PartitionId, int]:
        """Tasks taken and waiting for a slot, per partition (ready or held back by a limit)."""
        with self._lock:
            return self._ready.waiting()

    # --- taking tasks ----------------------------------------------------------------------

    def take(self, partition: PartitionId, message: records_pb2.TaskMessage,
             function: functions_pb2.Function | None, ack: RecordAck,
             stored: StoredTask | None = None, *, checked: bool = False) -> bool:
        """A record of the partition: a task to run, or a control record.

        ``checked``: its stored state was read (``stored``; None when it does not exist);
        otherwise it is a task the gateway just created (state QUEUED or SCHEDULED).

        Returns:
            False when the partition is not (any more) this owner's: nothing was done.
        """
        with self._lock:
            if partition not in self._partitions or not self._partitions[partition].ready:
                return False
            key = TaskKey(message.tenant_id, message.task_id)
            if message.kind == Kind.MESSAGE_KIND_CANCEL:
                self._cancel(partition, key, message, stored, ack)
            elif message.kind == Kind.MESSAGE_KIND_REDRIVE:
                self._redrive(partition, key, message, function, stored, ack)
            elif key in self._held:
                ack.done()  # a repeat of a task it already holds
            elif checked:
                self._resume(partition, key, message, function, stored, ack)
            else:
                self._fresh(partition, key, message, function, ack)
            self._assign()
            return True

    def _new_held(self, partition: PartitionId, key: TaskKey,
                  message: records_pb2.TaskMessage, function: functions_pb2.Function | None,
                  *, state: State, status: records_pb2.TaskStatus | None = None,
                  stored: StoredTask | None = None) -> Held:
        created = micros(message.create_time.ToDatetime(tzinfo=UTC)) \
            if message.HasField("create_time") else 0
        # Queued since its record was produced; rebuilt from its stored state, since created.
        due = message.enqueue_time.ToNanoseconds() / 1e9 if message.HasField("enqueue_time") \
            else created / 1e6 if created else time.time()
        held = Held(key=key, partition=partition, message=message, function=function,
                    state=state, status=status or records_pb2.TaskStatus(), floor=created,
                    due=due)
        if stored is not None:
            held.earlier = stored.attempts()  # a dead letter carries every attempt
        self._held[key] = held
        return held

    def _fresh(self, partition: PartitionId, key: TaskKey, message: records_pb2.TaskMessage,
               function: functions_pb2.Function | None, ack: RecordAck) -> None:
        scheduled = message.HasField("schedule_time") and \
            message.schedule_time.ToDatetime(tzinfo=UTC) > now_utc()
        held = self._new_held(partition, key, message, function,
                              state=State.TASK_STATE_SCHEDULED if scheduled
                              else State.TASK_STATE_QUEUED)
        held.acks.append(ack)
        self._admit(held)

    def _admit(self, held: Held) -> None:
        """Decides what a task the owner just took does next: wait, park, end or queue."""
        message = held.message
        if _expired(message):
            self._end(held, State.TASK_STATE_EXPIRED, "its expire_time passed while it waited")
            return
        if held.state == State.TASK_STATE_SCHEDULED:
            due = to_millis(message.schedule_time.ToDatetime(tzinfo=UTC))
            held.status.next_run_time.CopyFrom(timestamp_of(due))
            self._wait(held, Timer(held.key.tenant_id, held.key.task_id, due,
                                   TimerKind.TIMER_KIND_RUN), change_state=False)
            return
        if held.function is None:
            self._fail_unknown_function(held)
            return
        if held.function.state in HELD:
            held.park = True
            held.status.parked = True
            held.state = State.TASK_STATE_QUEUED
            if message.HasField("expire_time"):  # it may wait parked past its expiry
                held.timers.append(Timer(held.key.tenant_id, held.key.task_id,
                                         to_millis(message.expire_time.ToDatetime(tzinfo=UTC)),
                                         TimerKind.TIMER_KIND_EXPIRE))
            self._mark(held, release=True)
            return
        self._ready.push(held)

    def _wait(self, held: Held, timer: Timer, *, change_state: bool) -> None:
        """Leaves the task waiting for its timer (and its expiry's, if any)."""
        held.timers.append(timer)
        if held.message.HasField("expire_time"):
            held.timers.append(Timer(held.key.tenant_id, held.key.task_id,
                                     to_millis(held.message.expire_time.ToDatetime(tzinfo=UTC)),
                                     TimerKind.TIMER_KIND_EXPIRE))
        if not change_state and not held.dirty:
            # The state stays as the gateway wrote it: only the timers need writing, which
            # the flush does for any task it releases.
            held.release = True
            self._dirty[held.key] = held
            self._wake_flusher()
            return
        self._mark(held, release=True)

    def _resume(self, partition: PartitionId, key: TaskKey, message: records_pb2.TaskMessage,
                function: functions_pb2.Function | None, stored: StoredTask | None,
                ack: RecordAck) -> None:
        """A task record whose state was read: replayed, swept, released from parking."""
        if stored is None or stored.state not in WAITING | OUT:
            ack.done()  # gone, or already final
            return
        if stored.state in OUT:
            self._adopt(partition, stored, function, ack)
            return
        if stored.state in (State.TASK_STATE_RETRY_WAIT,):
            ack.done()  # its timer re-runs it
            return
        held = self._new_held(partition, key, message, function, state=stored.state,
                              status=stored.status, stored=stored)
        held.payload_override = stored.payload_override
        held.acks.append(ack)
        if stored.state == State.TASK_STATE_SCHEDULED:
            self._admit(held)
            return
        held.status.parked = False
        self._admit(held)

    def _adopt(self, partition: PartitionId, stored: StoredTask,
               function: functions_pb2.Function | None, ack: RecordAck | None) -> None:
        """Takes over an attempt another owner sent out: its executor may still report it;
        if its lease runs out first, it is retried."""
        key = stored.key
        if key in self._held or not stored.status.attempt_id:
            if ack:
                ack.done()
            return
        current = _current_attempt(stored)
        message = _message_of(stored)
        held = self._new_held(partition, key, message, function, state=stored.state,
                              status=stored.status, stored=stored)
        held.payload_override = stored.payload_override
        held.attempt = current
        held.executor = stored.status.executor_id
        expiry = stored.status.lease_expire_time.ToDatetime(tzinfo=UTC) \
            if stored.status.HasField("lease_expire_time") else now_utc()
        held.persisted_lease = expiry
        held.lease_deadline = self._clock() + max(0.0, (expiry - now_utc()).total_seconds())
        self._send_out(stored.status.attempt_id, held,
                       [key for key, _ in self._limits_of(held)])
        self._mark(held)  # listed again in flight under this epoch, for a next owner
        if ack:
            ack.done()

    def adopt(self, partition: PartitionId, stored: Iterable[StoredTask],
              functions: Callable[[str, str], functions_pb2.Function | None]) -> None:
        """Attempts found in the partition's in-flight index at assignment."""
        with self._lock:
            if partition not in self._partitions:
                return
            for task in stored:
                if task.state in OUT and (task.spec.topic, task.spec.partition) == partition:
                    self._adopt(partition, task, functions(task.key.tenant_id,
                                                           task.spec.task.function), None)

    def _redrive(self, partition: PartitionId, key: TaskKey, message: records_pb2.TaskMessage,
                 function: functions_pb2.Function | None, stored: StoredTask | None,
                 ack: RecordAck) -> None:
        if key in self._held or stored is None or stored.state != State.TASK_STATE_FAILED:
            ack.done()  # not (any more) in the dead letters
            return
        status = records_pb2.TaskStatus()
        status.CopyFrom(stored.status)
        status.attempts_before_redrive = status.attempt_count
        status.redrive_count += 1
        status.ClearField("series_start_time")
        held = self._new_held(partition, key, _message_of(stored), function,
                              state=State.TASK_STATE_QUEUED, status=status, stored=stored)
        held.payload_override = message.payload_override \
            if message.HasField("payload_override") else stored.payload_override
        if message.HasField("payload_override"):
            held.message.payload = message.payload_override
        held.acks.append(ack)
        held.due = time.time()
        self._stage(held, State.TASK_STATE_QUEUED, "re-driven from the dead letters")
        held.dirty = True
        self._dirty[key] = held
        self._admit(held)

    def _cancel(self, partition: PartitionId, key: TaskKey, message: records_pb2.TaskMessage,
                stored: StoredTask | None, ack: RecordAck) -> None:
        reason = message.reason or "cancelled by a caller"
        held = self._held.get(key)
        if held is not None:
            held.acks.append(ack)
            if held.state in FINAL_STATES:
                ack.done()
                held.acks.remove(ack)
                return
            if held.attempt is not None and held.status.attempt_id:
                self._interrupt(held, reason)
            self._ready.remove(held)
            self._end(held, State.TASK_STATE_CANCELLED, reason)
            return
        if stored is None or stored.state in FINAL_STATES:
            ack.done()
            return
        held = self._new_held(partition, key, _message_of(stored), None, state=stored.state,
                              status=stored.status)
        held.acks.append(ack)
        if stored.state in OUT:  # out at an executor under another epoch: stop it anyway
            held.attempt = _current_attempt(stored)
            held.executor = stored.status.executor_id
            self._interrupt(held, reason, attempt_id=stored.status.attempt_id)
        self._end(held, State.TASK_STATE_CANCELLED, reason)

    def _interrupt(self, held: Held, reason: str, *, attempt_id: str = "") -> None:
        """Stops the attempt out now: the executor is told, its later report is stale."""
        attempt_id = attempt_id or held.status.attempt_id
        self._bring_back(attempt_id)
        for stream in self._streams.values():
            if stream.executor_id == held.executor:
                stream.cancel.append(attempt_id)
                stream.wake()
        attempt = held.attempt
        assert attempt is not None
        attempt.end_time.CopyFrom(timestamp_of(now_utc()))
        attempt.exit_reason = Exit.EXIT_REASON_CANCELLED
        attempt.status.CopyFrom(status_pb2.Status(code=code_pb2.CANCELLED, message=reason))
        held.history.attempts.append(attempt)
        held.attempt = None

    def _fail_unknown_function(self, held: Held) -> None:
        attempt = tasks_pb2.Attempt(
            attempt_number=held.status.attempt_count + 1, end_time=timestamp_of(now_utc()),
            status=status_pb2.Status(code=code_pb2.NOT_FOUND, message=(
                f"function {held.message.function!r} does not exist (any more)")),
            error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE,
            exit_reason=Exit.EXIT_REASON_RAISED)
        held.status.attempt_count += 1
        held.status.last_status.CopyFrom(attempt.status)
        held.history.attempts.append(attempt)
        held.dead_letter = True
        self._end(held, State.TASK_STATE_FAILED, attempt.status.message, attempt=attempt)

    # --- timers ----------------------------------------------------------------------------

    def fire(self, partition: PartitionId, timer: Timer, stored: StoredTask | None,
             function: functions_pb2.Function | None) -> None:
        """A due timer of the partition, with its task's state as read."""
        with self._lock:
            if partition not in self._partitions or stored is None:
                return
            key = stored.key
            if key in self._held or stored.state not in WAITING:
                return
            expired = stored.spec.task.HasField("expire_time") and \
                stored.spec.task.expire_time.ToDatetime(tzinfo=UTC) <= now_utc()
            if timer.kind == TimerKind.TIMER_KIND_EXPIRE or expired:
                held = self._new_held(partition, key, _message_of(stored), function,
                                      state=stored.state, status=stored.status)
                self._end(held, State.TASK_STATE_EXPIRED,
                          "its expire_time passed before it could start")
                return
            if stored.state not in (State.TASK_STATE_SCHEDULED, State.TASK_STATE_RETRY_WAIT):
                return
            # A retry's due time is in its status; a delayed start's is its schedule_time
            # (the owner leaves a task it only schedules as the gateway wrote it).
            if stored.status.HasField("next_run_time"):
                due = stored.status.next_run_time.ToDatetime(tzinfo=UTC)
            elif stored.spec.task.HasField("schedule_time"):
                due = stored.spec.task.schedule_time.ToDatetime(tzinfo=UTC)
            else:
                due = None
            if due is None or to_millis(due) != timer.due_time:
                return  # a timer the task no longer waits for
            held = self._new_held(partition, key, _message_of(stored), function,
                                  state=State.TASK_STATE_QUEUED, status=stored.status,
                                  stored=stored)
            held.payload_override = stored.payload_override
            if stored.payload_override is not None:
                held.message.payload = stored.payload_override
            held.status.ClearField("next_run_time")
            held.due = due.timestamp()  # its delayed start's or its retry's
            self._stage(held, State.TASK_STATE_QUEUED, "due")
            held.dirty = True
            self._dirty[key] = held
            self._admit(held)
            self._assign()

    # --- executors -------------------------------------------------------------------------

    def connect(self, stream_id: int, executor_id: str, wake: Callable[[], object]) -> Stream:
        with self._lock:
            stream = Stream(executor_id, wake)
            self._streams[stream_id] = stream
            stream.wake()
            return stream

    def disconnect(self, stream_id: int) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    def next_response(self, stream_id: int) -> dispatcher_pb2.WorkResponse | None:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return None
            return stream.take(sorted((p, s.ownership.epoch)
                                      for p, s in self._partitions.items() if s.ready))

    def work(self, stream_id: int, request: dispatcher_pb2.WorkRequest) -> None:
        """A message of an executor's Work stream: credits, reports, renewals."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            if request.draining:
                stream.draining = True
                stream.credits = 0
            else:
                stream.credits += max(0, request.credits)
                if request.HasField("below_high_credits"):
                    stream.below_high = max(0, request.below_high_credits)
            for report in request.reports:
                self._report(stream, report)
            for attempt_id in request.renew:
                self._renew(stream, attempt_id)
            self._assign()
            stream.wake()

    def _known(self, stream: Stream, attempt_id: str, partition: PartitionId) -> Held | None:
        held = self._attempts.get(attempt_id)
        if held is not None:
            return held
        if partition in self._partitions and self._partitions[partition].ready:
            stream.stale.append(attempt_id)  # ours, but no longer this attempt's
        else:
            stream.moved.append(attempt_id)
        return None

    def _renew(self, stream: Stream, attempt_id: str) -> None:
        held = self._attempts.get(attempt_id)
        if held is None:
            partition = _partition_of_attempt(attempt_id)
            if partition is not None and partition in self._partitions and \
                    self._partitions[partition].ready:
                stream.stale.append(attempt_id)
            else:
                stream.moved.append(attempt_id)
            return
        held.lease_deadline = self._clock() + self._lease.total_seconds()
        expiry = now_utc() + self._lease
        if held.persisted_lease is None or expiry - held.persisted_lease > self._lease / 2:
            self._mark(held)  # a new lease expiry, so a next owner waits for it

    def _report(self, stream: Stream, report: dispatcher_pb2.AttemptReport) -> None:
        held = self._known(stream, report.attempt_id, (report.topic, report.partition))
        if held is None or held.attempt is None:
            return
        attempt = held.attempt
        if report.HasField("start_time") and not attempt.HasField("start_time"):
            attempt.start_time.CopyFrom(report.start_time)
            if held.state == State.TASK_STATE_DISPATCHED:
                held.state = State.TASK_STATE_RUNNING
                self._stage(held, State.TASK_STATE_RUNNING, "", at=report.start_time,
                            service=EXECUTOR)
            if held.out_since is None:
                self._mark(held)  # already written as dispatched: RUNNING is news
        if not report.HasField("end_time"):
            return
        attempt.end_time.CopyFrom(report.end_time)
        attempt.exit_reason = report.exit_reason or Exit.EXIT_REASON_RETURNED
        attempt.status.CopyFrom(report.status if report.HasField("status")
                                else status_pb2.Status(code=code_pb2.OK))
        attempt.error_class = report.error_class
        if report.HasField("retry_delay"):
            attempt.requested_retry_delay.CopyFrom(report.retry_delay)
        if report.log.text:  # stored beside the outcome, in the same flush
            held.logs.append(AttemptLogWrite(
                tenant_id=held.key.tenant_id, task_id=held.key.task_id,
                attempt_number=attempt.attempt_number, text=report.log.text,
                truncated=report.log.truncated,
                original_bytes=report.log.original_bytes,
                end_time=report.end_time.ToDatetime(tzinfo=UTC)))
        self._bring_back(report.attempt_id)
        held.reports.append((stream, report.attempt_id))
        self._finish_attempt(held, attempt, result=report.result, service=EXECUTOR)

    def _finish_attempt(self, held: Held, attempt: tasks_pb2.Attempt, *,
                        result: bytes = b"", service: str = SERVICE) -> None:
        """The attempt ended (returned, raised, timed out, crashed, lost its lease)."""
        if held.function is not None and held.function.rate_limits.adaptive.enabled:
            self._limiter.ended((held.key.tenant_id, held.message.function), throttled=(
                attempt.status.code != code_pb2.OK
                and attempt.error_class == ErrorClass.ERROR_CLASS_THROTTLED))
        held.attempt = None
        if held.span is not None:
            tracing.end_with(held.span, error=attempt.status.message
                             if attempt.status.code != code_pb2.OK else None)
            held.span = None
        held.history.attempts.append(attempt)
        held.status.last_status.CopyFrom(attempt.status)
        held.status.ClearField("attempt_id")
        held.status.ClearField("lease_expire_time")
        if attempt.status.code == code_pb2.OK:
            held.result = result
            self._end(held, State.TASK_STATE_SUCCEEDED, "", attempt=attempt, service=service)
            return
        function = held.function
        policy = RetryPolicy.of(function.retry_config if function else common_pb2.RetryConfig(),
                                held.message.retry_config if held.message.HasField(
                                    "retry_config") else common_pb2.RetryConfig())
        now = now_utc()
        series_start = held.status.series_start_time.ToDatetime(tzinfo=UTC) \
            if held.status.HasField("series_start_time") else now
        decision = decide(
            policy, error_class=attempt.error_class or ErrorClass.ERROR_CLASS_RETRYABLE,
            attempts=held.status.attempt_count - held.status.attempts_before_redrive, now=now,
            first_attempt_time=series_start,
            requested_delay=attempt.requested_retry_delay.ToTimedelta()
            if attempt.HasField("requested_retry_delay") else None,
            expire_time=held.message.expire_time.ToDatetime(tzinfo=UTC)
            if held.message.HasField("expire_time") else None)
        detail = f"{attempt.status.message} — {decision.detail}"
        if decision.state != State.TASK_STATE_RETRY_WAIT:
            held.dead_letter = decision.state == State.TASK_STATE_FAILED
            self._end(held, decision.state, detail, attempt=attempt, service=service)
            return
        due = to_millis(now + decision.delay)
        held.state = State.TASK_STATE_RETRY_WAIT
        held.status.next_run_time.CopyFrom(timestamp_of(due))
        held.status.update_time.CopyFrom(timestamp_of(now))
        self._stage(held, State.TASK_STATE_RETRY_WAIT, detail, attempt=attempt.attempt_number,
                    service=service)
        held.outcome = _outcome(held, attempt)
        self._wait(held, Timer(held.key.tenant_id, held.key.task_id, due,
                               TimerKind.TIMER_KIND_RUN), change_state=True)

    def tick(self) -> None:
        """Writes attempts out for long enough; retries those whose lease expired (their
        executor stopped renewing)."""
        now = self._clock()
        persist_before = now - PERSIST_AFTER.total_seconds()
        with self._lock:
            for held in self._attempts.values():
                if held.out_since is not None and held.out_since <= persist_before:
                    self._mark(held)
            for attempt_id, held in list(self._attempts.items()):
                if held.lease_deadline > now or held.attempt is None:
                    continue
                self._bring_back(attempt_id)
                attempt = held.attempt
                attempt.end_time.CopyFrom(timestamp_of(now_utc()))
                attempt.exit_reason = Exit.EXIT_REASON_LEASE_LOST
                attempt.error_class = ErrorClass.ERROR_CLASS_RETRYABLE
                attempt.status.CopyFrom(status_pb2.Status(
                    code=code_pb2.UNAVAILABLE,
                    message="lease expired: the executor stopped renewing it"))
                log.info("an attempt's lease expired", extra=logs.task_fields(
                    held.key.tenant_id, held.key.task_id, held.message.trace_context))
                self._finish_attempt(held, attempt)
            self._assign()

    def pace(self) -> None:
        """Lets out the tasks held back by a rate whose tokens came since (every few ms)."""
        with self._lock:
            keys = self._ready.aside_keys()
            if not keys:
                return
            for key in keys:
                self._release(key)
            self._assign()

    # --- cluster-wide limits (see services/dispatcher/limits.py) ------------------------------

    def limit_demands(self) -> list[router_pb2.LimitDemand]:
        """What this dispatcher wants of each limited function, for the router."""
        with self._lock:
            return self._limiter.demands(waiting=self._ready.aside,
                                         out=lambda key: self._out.get(key, 0))

    def backlog(self) -> dict[str, int]:
        """Tasks taken and waiting for a slot, by tenant."""
        with self._lock:
            return self._ready.tenants()

    def partition_backlog(self) -> dict[PartitionId, int]:
        """Tasks taken and waiting for a slot, by partition."""
        with self._lock:
            return self._ready.waiting()

    def out(self) -> int:
        """Attempts out at executors (dispatched or running)."""
        with self._lock:
            return len(self._attempts)

    def limits_wanted(self) -> bool:
        """Whether the router should hear from this dispatcher now: a limited function waits
        for its first share, or a share shrank or has nothing left to pace."""
        with self._lock:
            return self._limiter.wanted or self._limiter.idle(self._ready.aside)

    def share_limits(self, shares: list[router_pb2.LimitShare], *, lease: float) -> None:
        """The router's shares: tasks they allow go out."""
        with self._lock:
            self._limiter.apply(shares, lease)
            for key in self._ready.aside_keys():
                self._release(key)
            self._assign()

    def _assign(self) -> None:
        """Hands ready tasks to the executors with credits, most credits first; a task whose
        function is at its share of its limits waits aside until the share allows it."""
        while len(self._ready):
            streams = [s for s in self._streams.values() if s.credits > 0 and not s.draining]
            if not streams:
                return
            # NORMAL and LOW go only where the executor has room beyond its HIGH reserve.
            lower = [s for s in streams if s.below_high is None or s.below_high > 0]
            held = self._ready.pop(below_high=bool(lower))
            if held is None:
                return
            if held.message.priority == HIGH:
                stream = max(streams, key=lambda s: s.credits)
            else:
                stream = max(lower, key=lambda s: s.credits if s.below_high is None
                             else s.below_high)
            if self._held.get(held.key) is not held or held.state in FINAL_STATES:
                continue  # cancelled or expired while it waited
            if self._function_now is not None:
                held.function = self._function_now(held.key.tenant_id, held.message.function,
                                                   held.function)
            if held.function is None or held.function.state in HELD or _expired(held.message):
                self._admit(held)  # it fails, parks or ends EXPIRED instead
                continue
            limited = self._limits_of(held)
            blocked = self._limiter.admit([
                (key, limits, self._out.get(key, 0)) for key, limits in limited])
            if blocked is not None:
                self._ready.set_aside(blocked, held)
                continue
            self._dispatch(held, stream, [key for key, _ in limited])

    def _limits_of(self, held: Held) -> list[tuple[LimitKey, common_pb2.RateLimits]]:
        """The limits a task goes out within: its function's and its tenant's, where set,
        and their quotas for the task's tier."""
        tenant = self._tenant_limits(held.key.tenant_id)
        both = [((held.key.tenant_id, held.message.function),
                 held.function.rate_limits if held.function else None),
                ((held.key.tenant_id, ""), tenant)]
        limited = [(key, limits) for key, limits in both
                   if limits is not None and Limiter.applies(limits)]
        return limited + [quota for key, limits in limited
                          for quota in tier_quotas(key, limits, held.message.priority)]

    def _send_out(self, attempt_id: str, held: Held, limited: list[LimitKey]) -> None:
        """Counts the attempt out under its function, its tenant and the limits it went out
        within (``limited``), until `_bring_back`."""
        self._attempts[attempt_id] = held
        own = [(held.key.tenant_id, held.message.function), (held.key.tenant_id, "")]
        held.out_keys = own + [key for key in limited if key not in own]
        for key in held.out_keys:
            self._out[key] = self._out.get(key, 0) + 1

    def _bring_back(self, attempt_id: str) -> None:
        """An attempt is no longer out: its function may send out one that waited."""
        held = self._attempts.pop(attempt_id, None)
        if held is None:
            return
        for key in held.out_keys:
            left = self._out.get(key, 1) - 1
            if left > 0:
                self._out[key] = left
            else:
                self._out.pop(key, None)
            self._release(key)

    def _release(self, key: LimitKey) -> None:
        count = self._ready.aside(key)
        if count:
            self._ready.release(key, min(count, self._limiter.releasable(
                key, out=self._out.get(key, 0))))

    def _dispatch(self, held: Held, stream: Stream, limited: list[LimitKey]) -> None:
        partition = self._partitions[held.partition]
        attempt_id = f"{held.partition[0]}/{held.partition[1]}/{partition.ownership.epoch}/" \
                     f"{next(self._attempt_ids)}"
        now = now_utc()
        number = held.status.attempt_count + 1
        held.status.attempt_count = number
        held.status.attempt_id = attempt_id
        held.status.executor_id = stream.executor_id
        if not held.status.HasField("series_start_time"):
            held.status.series_start_time.CopyFrom(timestamp_of(now))
        held.attempt = tasks_pb2.Attempt(attempt_number=number, executor_id=stream.executor_id,
                                         dispatch_time=timestamp_of(now))
        held.executor = stream.executor_id
        held.lease_deadline = self._clock() + self._lease.total_seconds()
        held.state = State.TASK_STATE_DISPATCHED
        self._stage(held, State.TASK_STATE_DISPATCHED, "", attempt=number)
        self._send_out(attempt_id, held, limited)
        held.out_since = self._clock()  # written by `tick` unless it ends first
        function = held.function
        timeout = function.timeout if function and function.HasField("timeout") else \
            Duration(seconds=int(DEFAULT_TIMEOUT.total_seconds()))
        task = records_pb2.TaskMessage()
        task.CopyFrom(held.message)
        task.payload = held.payload
        task.attempt_number = number
        held.span = _trace_dispatch(held, number, stream.executor_id)
        if held.span is not None:  # the executor's spans are the attempt's children
            tracing.update(task.trace_context, tracing.carrier_of(held.span))
        stream.assignments.append(dispatcher_pb2.Assignment(
            attempt_id=attempt_id, topic=held.partition[0], partition=held.partition[1],
            task=task, handler=function.handler if function else "", timeout=timeout,
            worker_concurrency=(function.worker_concurrency if function else 0)
            or DEFAULT_WORKER_CONCURRENCY))
        stream.credits -= 1
        if stream.below_high is not None:
            lower = held.message.priority != HIGH
            stream.below_high = min(stream.credits, max(0, stream.below_high - lower))
        stream.wake()
        if self._metrics is not None:
            self._metrics.dispatched(held.key.tenant_id, held.message.function,
                                     time.time() - held.due)

    # --- changes and flushing --------------------------------------------------------------

    def _stage(self, held: Held, state: State, detail: str, *, attempt: int | None = None,
               at: Timestamp | None = None, service: str = SERVICE) -> None:
        stage = tasks_pb2.TaskStage(
            state=state, service=service, detail=detail[:1024],
            attempt_number=held.status.attempt_count if attempt is None else attempt)
        stage.time.CopyFrom(at if at is not None else timestamp_of(now_utc()))
        held.history.stages.append(stage)

    def _end(self, held: Held, state: State, detail: str, *,
             attempt: tasks_pb2.Attempt | None = None, service: str = SERVICE) -> None:
        """A final state: written, published, then the task leaves memory."""
        held.state = state
        held.status.ClearField("attempt_id")
        held.status.ClearField("lease_expire_time")
        held.status.ClearField("next_run_time")
        self._stage(held, state, detail,
                    attempt=attempt.attempt_number if attempt else None, service=service)
        held.outcome = _outcome(held, attempt)
        self._mark(held, release=True)

    def _mark(self, held: Held, *, release: bool = False) -> None:
        held.dirty = True
        held.release = held.release or release
        self._dirty[held.key] = held
        self._wake_flusher()

    def _forget(self, held: Held) -> None:
        self._held.pop(held.key, None)
        self._dirty.pop(held.key, None)
        attempt_id = held.status.attempt_id
        if attempt_id and self._attempts.get(attempt_id) is held:
            self._bring_back(attempt_id)

    def has_changes(self) -> bool:
        with self._lock:
            return bool(self._dirty)

    def collect(self) -> FlushBatch:
        """Everything changed since the last flush, as writes with fenced timestamps."""
        batch = FlushBatch()
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            for held in dirty.values():
                partition = self._partitions.get(held.partition)
                if partition is None:
                    continue
                try:
                    stamp = partition.clock.next(held.floor)
                except TimestampRange.Exhausted:
                    self._dirty[held.key] = held  # after the range's renewal
                    continue
                batch.held.append(held)
                batch.epochs[held.partition] = partition.ownership.epoch
                batch.reports += [(stream, attempt_id, held.partition)
                                  for stream, attempt_id in held.reports]
                batch.acks += held.acks
                held.reports, held.acks = [], []
                if held.logs:
                    batch.logs += [(log, stamp) for log in held.logs]
                    held.logs = []
                if held.timers:
                    batch.timers.setdefault(held.partition, []).extend(held.timers)
                    batch.timer_stamps[held.partition] = stamp
                    held.timers = []
                if held.outcome is not None:
                    batch.outcomes.append((held.partition, held.outcome))
                    held.outcome = None
                if held.park:
                    batch.parked.append((held.partition, held.message))
                    held.park = False
                if held.dead_letter:
                    batch.dead_letters.append(self._stored_view(held))
                    held.dead_letter = False
                held.out_since = None
                if held.attempt is not None and held.status.attempt_id:
                    expiry = now_utc() + self._lease
                    held.status.lease_expire_time.CopyFrom(timestamp_of(expiry))
                    held.persisted_lease = expiry
                    bucket = (held.partition[0], held.partition[1], minute_of(expiry))
                    batch.inflight.setdefault(bucket, []).append(InflightEntry(
                        held.key.tenant_id, held.key.task_id, held.status.attempt_id))
                    batch.inflight_stamps[bucket] = stamp
                if not held.dirty:
                    continue  # only timers to write (a task staying as the gateway wrote it)
                if held.attempt is not None and held.status.attempt_id:
                    # The attempt out now, as it stands: an adopting owner continues it.
                    held.history.attempts.append(held.attempt)
                held.status.update_time.CopyFrom(timestamp_of(now_utc()))
                status = records_pb2.TaskStatus()
                status.CopyFrom(held.status)
                batch.writes.append(TaskWrite(
                    key=held.key, state=held.state, status=status, history=held.history,
                    timestamp=stamp,
                    result=held.result if held.state == State.TASK_STATE_SUCCEEDED else None,
                    payload_override=held.payload_override))
                held.history = records_pb2.TaskHistory()
                held.dirty = False
        return batch

    def flushed(self, batch: FlushBatch) -> list[records_pb2.AttemptOutcome]:
        """The batch is durable: acknowledge records, release what may wait alone.

        Returns the outcomes to publish: those of partitions still held under the epoch the
        batch was written in. A partition lost while its write was retried wrote with a range
        its successor's writes outrank; its executors' reports go to the successor (`moved`),
        which publishes their outcomes.
        """
        with self._lock:
            kept = {p for p, epoch in batch.epochs.items()
                    if p in self._partitions and self._partitions[p].ownership.epoch == epoch}
            for held in batch.held:
                if held.release and not held.dirty and self._held.get(held.key) is held:
                    self._forget(held)
            for stream, attempt_id, partition in batch.reports:
                (stream.durable if partition in kept else stream.moved).append(attempt_id)
                stream.wake()
            outcomes = [outcome for partition, outcome in batch.outcomes if partition in kept]
        for ack in batch.acks:
            ack.done()
        return outcomes

    def _stored_view(self, held: Held) -> StoredTask:
        """What a dead letter needs of a task: its spec-like message and attempts."""
        spec = records_pb2.TaskSpec(tenant_id=held.key.tenant_id, topic=held.partition[0],
                                    partition=held.partition[1])
        task = spec.task
        task.task_id, task.function = held.key.task_id, held.message.function
        task.payload = held.payload
        status = records_pb2.TaskStatus()
        status.CopyFrom(held.status)
        history = records_pb2.TaskHistory(attempts=[*held.earlier, *held.history.attempts])
        return StoredTask(spec=spec, state=State.TASK_STATE_FAILED, status=status,
                          history=[history])

    def _announce(self) -> None:
        for stream in self._streams.values():
            stream.owned_changed = True
            stream.wake()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"held": len(self._held), "ready": len(self._ready),
                    "out": len(self._attempts), "dirty": len(self._dirty),
                    "partitions": len(self._partitions)}


def _outcome(held: Held, attempt: tasks_pb2.Attempt | None) -> records_pb2.AttemptOutcome:
    succeeded = held.state == State.TASK_STATE_SUCCEEDED
    outcome = records_pb2.AttemptOutcome(
        tenant_id=held.key.tenant_id, task_id=held.key.task_id,
        function=held.message.function, state=held.state,
        result=(held.result or b"") if succeeded else b"",
        result_targets=held.message.result_targets, trace_context=held.message.trace_context)
    if attempt is not None:
        outcome.attempt.CopyFrom(attempt)
    return outcome


def _trace_dispatch(held: Held, number: int, executor_id: str) -> Span | None:
    """A sampled task's wait in the queue, recorded, and its attempt's span, started."""
    context = held.message.trace_context
    if not tracing.sampled(context):
        return None
    now_ns = time.time_ns()
    partition = {"messaging.destination.name": held.partition[0],
                 "messaging.destination.partition.id": str(held.partition[1])}
    tracing.record(context, "weir.queue_wait", min(int(held.due * 1e9), now_ns), now_ns,
                   attributes={**partition, "weir.attempt": number})
    return tracing.start(context, "weir.attempt", start_ns=now_ns, kind=SpanKind.CLIENT,
                         attributes={**partition, "weir.attempt": number,
                                     "weir.executor_id": executor_id})


def _expired(message: records_pb2.TaskMessage) -> bool:
    return message.HasField("expire_time") and \
        message.expire_time.ToDatetime(tzinfo=UTC) <= now_utc()


def _current_attempt(stored: StoredTask) -> tasks_pb2.Attempt:
    """The attempt out at an executor (DISPATCHED or RUNNING), as its owner last wrote it."""
    number = stored.status.attempt_count
    for attempt in reversed(stored.attempts()):
        if attempt.attempt_number == number:
            current = tasks_pb2.Attempt()
            current.CopyFrom(attempt)
            return current
    return tasks_pb2.Attempt(attempt_number=number, executor_id=stored.status.executor_id)


def _message_of(stored: StoredTask) -> records_pb2.TaskMessage:
    """The task as a record would carry it, rebuilt from its stored spec."""
    task = stored.spec.task
    message = records_pb2.TaskMessage(
        tenant_id=stored.spec.tenant_id, task_id=task.task_id, function=task.function,
        payload=stored.payload, priority=task.priority, labels=task.labels,
        attempt_number=stored.status.attempt_count + 1,
        trace_context=stored.spec.trace_context)
    for name in ("create_time", "expire_time"):
        if task.HasField(name):
            getattr(message, name).CopyFrom(getattr(task, name))
    if task.HasField("retry_config"):
        message.retry_config.CopyFrom(task.retry_config)
    message.result_targets.extend(task.result_targets)
    return message


def _partition_of_attempt(attempt_id: str) -> PartitionId | None:
    """Attempt ids are ``topic/partition/epoch/n``."""
    parts = attempt_id.rsplit("/", 3)
    if len(parts) != 4:
        return None
    try:
        return parts[0], int(parts[1])
    except ValueError:
        return None
