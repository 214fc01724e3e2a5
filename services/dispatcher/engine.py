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
from datetime import timedelta

import grpc
from google.rpc import code_pb2, status_pb2
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, tasks_pb2

from libs.cassandra.tasks import BUCKETS, TaskStore, now_utc, timestamp_of
from libs.kafka.client import Consumer, ConsumerLoop, Message, Producer
from libs.taskqueue import task_record_to_kafka

log = logging.getLogger(__name__)


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
    handed to an executor, or found not leasable (a duplicate of a task already leased or
    finished). Long tasks therefore never hold offsets back; their lease does the guarding.
    """

    def __init__(self, *, dispatcher_id: str, tasks: TaskStore, consumer: Consumer,
                 directory: ExecutorDirectory, lease: timedelta, concurrency: int = 32,
                 stub_for: Callable[[str], executor_manager_pb2_grpc.ExecutorServiceStub]
                 ) -> None:
        self._id = dispatcher_id
        self._tasks = tasks
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
                                         expire_time=expire, attempt_number=task.attempt_number):
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


class LeaseSweeper:
    """Re-queues tasks whose lease expired: their executor died or stopped renewing."""

    def __init__(self, *, tasks: TaskStore, producer: Producer) -> None:
        self._tasks = tasks
        self._producer = producer

    def sweep(self) -> int:
        requeued = 0
        now = now_utc()
        for bucket in range(BUCKETS):
            for key, lease_id in self._tasks.expired_leases(bucket, now=now):
                stored = self._tasks.get(key.tenant_id, key.task_id)
                if stored is None or stored.lease_id != lease_id:
                    self._tasks.forget_lease(key, lease_id)  # a lease the task does not hold
                    continue
                record = stored.record
                record.task.attempts.append(tasks_pb2.Attempt(
                    attempt_number=record.task.attempt_count + 1,
                    exit_reason=tasks_pb2.ExitReason.EXIT_REASON_LEASE_LOST,
                    error_class=common_pb2.ErrorClass.ERROR_CLASS_RETRYABLE,
                    status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=(
                        "lease expired: the executor stopped renewing it")),
                    end_time=timestamp_of(now)))
                record.task.attempt_count += 1
                if not self._tasks.requeue(record, lease_id=lease_id,
                                           detail="lease expired: executor lost"):
                    continue
                queued_time = now_utc()
                self._producer.send_all([task_record_to_kafka(
                    record, attempt_number=record.task.attempt_count + 1)])
                self._tasks.mark_queued([record], queued_time=queued_time, record_stage=False)
                requeued += 1
                log.info("re-queued a task whose lease expired", extra={
                    "tenant": key.tenant_id, "task_id": key.task_id})
        return requeued
