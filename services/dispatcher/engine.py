"""Dispatching: lease each queued task and push it to the executor with the most free slots."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.rpc import code_pb2, status_pb2
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs.cache import TtlCache
from libs.cassandra.functions import FunctionStore
from libs.cassandra.parked import ParkedStore
from libs.cassandra.tasks import BUCKETS, now_utc, timestamp_of
from libs.kafka.client import Consumer, ConsumerLoop, Message
from libs.lifecycle import Lifecycle
from libs.retry import RetryPolicy

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
# Functions whose tasks are held: paused, or being deleted (their tasks are cancelled).
HELD = frozenset({functions_pb2.FunctionState.FUNCTION_STATE_PAUSED,
                  functions_pb2.FunctionState.FUNCTION_STATE_DELETING})


@dataclass
class Executor:
    executor_id: str
    address: str
    capacity: int
    in_flight: int
    draining: bool
    seen: float  # monotonic time of the last report

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight


class ExecutorDirectory:
    """The executors' reported load, adjusted locally between reports.

    `choose` picks the executor with the most free slots (ties at random), so work goes where
    there is capacity, not round-robin; an executor silent for ``stale_after`` is skipped.
    """

    def __init__(self, *, stale_after: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._executors: dict[str, Executor] = {}
        self._stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._reported = threading.Condition(self._lock)

    def report(self, *, executor_id: str, address: str, capacity: int, in_flight: int,
               draining: bool) -> None:
        with self._lock:
            self._executors[executor_id] = Executor(executor_id, address, capacity, in_flight,
                                                    draining, self._clock())
            self._reported.notify_all()

    def choose(self, exclude: set[str] = frozenset(), *, wait_seconds: float = 0.0
               ) -> Executor | None:
        """The executor with the most free slots, waiting up to ``wait_seconds`` for a report
        that frees one."""
        with self._lock:
            ready = self._ready(exclude)
            if not ready and wait_seconds > 0:
                self._reported.wait(wait_seconds)
                ready = self._ready(exclude)
            if not ready:
                return None
            most = max(e.free for e in ready)
            chosen = random.choice([e for e in ready if e.free == most])
            chosen.in_flight += 1  # until its next report says otherwise
            return chosen

    def _ready(self, exclude: set[str]) -> list[Executor]:
        now = self._clock()
        return [e for e in self._executors.values()
                if e.free > 0 and not e.draining and now - e.seen <= self._stale_after
                and e.executor_id not in exclude]

    def release(self, executor_id: str) -> None:
        """Gives back a slot `choose` reserved but did not use."""
        with self._lock:
            executor = self._executors.get(executor_id)
            if executor and executor.in_flight > 0:
                executor.in_flight -= 1

    def full(self, executor_id: str) -> None:
        """An executor refused work: treat it as full until it reports again."""
        with self._lock:
            executor = self._executors.get(executor_id)
            if executor:
                executor.in_flight = executor.capacity


class Dispatcher:
    """Consumes task topics, leases each task and pushes it to an executor.

    A message is acknowledged (its offset may be committed) once its task is leased and
    handed to an executor, found not leasable (a duplicate of a task already leased or
    finished), expired, or parked because its function is paused. Long tasks therefore never
    hold offsets back; their lease does the guarding.
    """

    def __init__(self, *, dispatcher_id: str, lifecycle: Lifecycle, functions: FunctionStore,
                 parked: ParkedStore, consumer: Consumer, directory: ExecutorDirectory,
                 lease: timedelta, concurrency: int = 32,
                 stub_for: Callable[[str], executor_manager_pb2_grpc.ExecutorServiceStub]
                 ) -> None:
        self._id = dispatcher_id
        self._lifecycle = lifecycle
        self._tasks = lifecycle.tasks
        self._functions = functions
        # A pause takes effect within this cache's TTL (see `_parked_if_paused`).
        self._function_states = TtlCache(self._function_state, ttl=1.0)
        self._parked = parked
        self._directory = directory
        self._lease = lease
        self._stub_for = stub_for
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dispatch")
        self._slots = threading.Semaphore(concurrency * 4)  # messages in hand at most
        self._loop = ConsumerLoop(consumer, self._submit, name="dispatcher")

    def start(self) -> Dispatcher:
        self._loop.start()
        return self

    def stop(self) -> None:
        self._loop.stop(before_close=lambda: self._pool.shutdown(wait=True))

    def _submit(self, message: Message) -> None:
        self._slots.acquire()
        self._pool.submit(self._handle_and_release, message)

    def _handle_and_release(self, message: Message) -> None:
        try:
            self.handle(message)
        except Exception:
            log.exception("dispatch failed; the message will be delivered again")
            message.nack()
        finally:
            self._slots.release()

    def handle(self, message: Message) -> None:
        """Waits for an executor with a free slot, then leases the task and pushes it.

        The lease is taken only once a slot is in sight, so a backlog waiting for capacity
        holds no leases (which would expire and be swept while the tasks still wait).
        """
        task = records_pb2.TaskMessage.FromString(message.value)
        if task.HasField("expire_time") and task.expire_time.ToDatetime(tzinfo=UTC) <= now_utc():
            self._lifecycle.end(self._tasks.get(task.tenant_id, task.task_id),
                                state=State.TASK_STATE_EXPIRED,
                                detail="its expire_time passed while it was queued")
            message.ack()
            return
        if self._parked_if_paused(task):
            message.ack()
            return
        lease_id, request = None, None
        refused: set[str] = set()
        while not self._loop.stopping:
            executor = self._directory.choose(exclude=refused, wait_seconds=0.5)
            if executor is None:
                refused.clear()  # none free: after the next reports, every executor again
                continue
            if lease_id is None:
                lease_id, expire = uuid.uuid4(), now_utc() + self._lease
                if not self._tasks.lease(task.tenant_id, task.task_id, lease_id=lease_id,
                                         expire_time=expire, attempt_number=task.attempt_number,
                                         executor_address=executor.address):
                    self._directory.release(executor.executor_id)
                    message.ack()  # already leased, finished or gone: this copy is a duplicate
                    return
                request = executor_manager_pb2.DispatchRequest(
                    task=task, lease_id=str(lease_id), lease_expire_time=timestamp_of(expire),
                    dispatcher_id=self._id)
            try:
                self._stub_for(executor.address).Dispatch(request, timeout=5)
                message.ack()
                return
            except grpc.RpcError as error:
                self._directory.full(executor.executor_id)
                refused.add(executor.executor_id)
                if error.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                    log.warning("executor refused a task", extra={
                        "executor": executor.executor_id, "code": error.code().name})
        # Stopping: a leased task is re-queued by the lease sweeper, an unleased one is
        # delivered again to whoever owns the partition next.
        message.nack()

    def _function_state(self, tenant_id: str, function: str) -> int:
        found = self._functions.get(tenant_id, function)
        return found.state if found else functions_pb2.FunctionState.FUNCTION_STATE_UNSPECIFIED

    def _parked_if_paused(self, task: records_pb2.TaskMessage) -> bool:
        """Holds the task of a paused function out of the queue (in Cassandra) until resumed.

        The park is written before the function's state is read afresh, and ResumeFunction
        writes the state before it reads the parked tasks: so either that read sees this
        park, or this read sees the resume and the task is dispatched here. None is stranded.
        """
        if self._function_states.get(task.tenant_id, task.function) not in HELD:
            return False
        self._parked.park(task)
        if self._function_state(task.tenant_id, task.function) in HELD:
            return True
        self._parked.unpark(task)
        return False


class LeaseSweeper:
    """Ends the attempts whose lease expired (their executor died or stopped renewing) as
    retryable failures: the task is retried by its policy, like after any crash."""

    def __init__(self, *, lifecycle: Lifecycle, functions: FunctionStore) -> None:
        self._lifecycle = lifecycle
        self._tasks = lifecycle.tasks
        self._functions = TtlCache(functions.get, ttl=5.0)

    def sweep(self) -> int:
        """Buckets are swept independently: trouble with one does not hold up the others."""
        ended = 0
        now = now_utc()
        for bucket in range(BUCKETS):
            try:
                ended += self._sweep_bucket(bucket, now=now)
            except Exception:
                log.exception("could not sweep a lease bucket; trying again next round",
                              extra={"bucket": bucket})
        return ended

    def _sweep_bucket(self, bucket: int, *, now: datetime) -> int:
        ended = 0
        for key, lease_id in self._tasks.expired_leases(bucket, now=now):
            stored = self._tasks.get(key.tenant_id, key.task_id)
            if stored is None or stored.lease_id != lease_id:
                self._tasks.forget_lease(key, lease_id)  # a lease the task does not hold
                continue
            record = stored.record
            attempt = tasks_pb2.Attempt(
                attempt_number=len(record.task.attempts) + 1,
                exit_reason=tasks_pb2.ExitReason.EXIT_REASON_LEASE_LOST,
                error_class=common_pb2.ErrorClass.ERROR_CLASS_RETRYABLE,
                status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=(
                    "lease expired: the executor stopped renewing it")),
                end_time=timestamp_of(now))
            function = self._functions.get(key.tenant_id, record.task.function)
            policy = RetryPolicy.of(function.retry_config if function
                                    else common_pb2.RetryConfig(), record.task.retry_config)
            if self._lifecycle.end_attempt(record, attempt, lease_id=lease_id,
                                           policy=policy) is not None:
                ended += 1
                log.info("ended an attempt whose lease expired", extra={
                    "tenant": key.tenant_id, "task_id": key.task_id})
        return ended
