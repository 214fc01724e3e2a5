"""Running pushed tasks: one attempt per worker process, fenced by the dispatcher's lease."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from google.rpc import code_pb2, status_pb2
from weir.internal.executor_manager.v1 import executor_manager_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2, worker_pb2

from libs.cache import TtlCache
from libs.cassandra.functions import FunctionStore
from libs.cassandra.tasks import now_utc, timestamp_of
from libs.errors import ResourceExhausted
from libs.lifecycle import Lifecycle
from libs.retry import RetryPolicy
from services.executor_manager.pool import WorkerPool, WorkerProcess

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
Exit = tasks_pb2.ExitReason
ErrorClass = common_pb2.ErrorClass
DEFAULT_TIMEOUT = timedelta(seconds=60)


@dataclass
class Running:
    tenant_id: str
    task_id: str
    lease_id: uuid.UUID
    worker: WorkerProcess
    function: str
    dispatch_time: datetime  # when the dispatcher handed it over
    cancelled: bool = False


@dataclass
class Outcome:
    """What one attempt produced, before it is recorded."""

    result: bytes = b""
    status: status_pb2.Status | None = None
    error_class: int = ErrorClass.ERROR_CLASS_UNSPECIFIED
    exit_reason: int = Exit.EXIT_REASON_RETURNED
    retry_delay: object | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is None or self.status.code == code_pb2.OK


class Executor:
    """Takes dispatched tasks while it has an idle worker; records and publishes outcomes."""

    def __init__(self, *, executor_id: str, lifecycle: Lifecycle, functions: FunctionStore,
                 pool: WorkerPool, lease: timedelta,
                 on_load_change: Callable[[], None] = lambda: None) -> None:
        self.executor_id = executor_id
        self._lifecycle = lifecycle
        self._tasks = lifecycle.tasks
        self._functions = TtlCache(functions.get, ttl=5.0)
        self._pool = pool
        self._lease = lease
        self._on_load_change = on_load_change
        self._running: dict[tuple[str, str], Running] = {}
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=pool.capacity * 2,
                                           thread_name_prefix="attempt")
        self.draining = False

    def load(self) -> executor_manager_pb2.GetLoadResponse:
        return executor_manager_pb2.GetLoadResponse(
            capacity=self._pool.capacity, in_flight=self._pool.in_flight,
            draining=self.draining)

    def dispatch(self, request: executor_manager_pb2.DispatchRequest) -> None:
        """Starts the attempt on an idle worker.

        Raises:
            ResourceExhausted: no idle worker, or draining; the dispatcher tries elsewhere.
        """
        key = (request.task.tenant_id, request.task.task_id)
        with self._lock:
            current = self._running.get(key)
        if current is not None and str(current.lease_id) == request.lease_id:
            return  # a dispatcher retrying a call whose answer it missed: already running
        function = self._functions.get(request.task.tenant_id, request.task.function)
        limit = function.rate_limits.max_concurrent_dispatches if function else 0
        if limit and self._running_of(request.task.tenant_id, request.task.function) >= limit:
            raise ResourceExhausted(
                f"function {request.task.function!r} is at its concurrency limit ({limit}) on "
                "this executor", retry_after=timedelta(milliseconds=100),
                reason="FUNCTION_CONCURRENCY_LIMIT", metadata={"executor_id": self.executor_id})
        worker = None if self.draining else self._pool.acquire()
        if worker is None:
            raise ResourceExhausted("no idle worker on this executor",
                                    retry_after=timedelta(milliseconds=100),
                                    reason="EXECUTOR_FULL",
                                    metadata={"executor_id": self.executor_id})
        self._on_load_change()
        running = Running(request.task.tenant_id, request.task.task_id,
                          uuid.UUID(request.lease_id), worker, request.task.function,
                          dispatch_time=now_utc())
        with self._lock:
            self._running[(running.tenant_id, running.task_id)] = running
        self._threads.submit(self._attempt, request.task, running)

    def _running_of(self, tenant_id: str, function: str) -> int:
        with self._lock:
            return sum(r.tenant_id == tenant_id and r.function == function
                       for r in self._running.values())

    def renew_leases(self) -> None:
        """Extends the lease of every running attempt; stops attempts whose lease was lost."""
        with self._lock:
            running = list(self._running.values())
        for attempt in running:
            if self._tasks.renew(attempt.tenant_id, attempt.task_id, lease_id=attempt.lease_id,
                                 expire_time=now_utc() + self._lease):
                continue
            with self._lock:
                # Only if it still runs: a finished attempt's worker may already serve another.
                if self._running.get((attempt.tenant_id, attempt.task_id)) is attempt:
                    log.warning("lease lost; stopping the attempt", extra={
                        "tenant": attempt.tenant_id, "task_id": attempt.task_id})
                    # Its Execute fails and the worker is replaced; the outcome write is
                    # fenced by the lease, so nothing of this attempt is recorded.
                    attempt.worker.terminate()

    def cancel(self, tenant_id: str, task_id: str) -> bool:
        """Stops a running attempt at once (CancelTask already ended the task and took its
        lease). Its worker process is killed and replaced: the only way to stop any handler,
        even one blocked in C code, within the 2 s CancelTask promises."""
        with self._lock:
            attempt = self._running.get((tenant_id, task_id))
            if attempt is None:
                return False
            attempt.cancelled = True
        log.info("cancelling a running attempt", extra={"tenant": tenant_id,
                                                        "task_id": task_id})
        attempt.worker.terminate()
        return True

    def drain(self, timeout_seconds: float) -> None:
        """Takes no new work and waits for running attempts to finish."""
        self.draining = True
        self._on_load_change()
        self._threads.shutdown(wait=True, cancel_futures=False)
        del timeout_seconds  # attempts end by their own timeouts

    def _attempt(self, message: records_pb2.TaskMessage, running: Running) -> None:
        try:
            self._run(message, running)
        except Exception:
            log.exception("attempt failed unexpectedly; its lease will expire and it will "
                          "run again", extra={"task_id": message.task_id})
        finally:
            self._done_with_worker(running, reusable=True)

    def _done_with_worker(self, running: Running, *, reusable: bool) -> None:
        """Ends the attempt's hold on its worker, once: forget it, then free or replace it."""
        with self._lock:
            if self._running.get((running.tenant_id, running.task_id)) is not running:
                return
            del self._running[(running.tenant_id, running.task_id)]
        if reusable:
            self._pool.release(running.worker)
        else:
            self._threads.submit(self._pool.replace, running.worker)
        self._on_load_change()

    def _run(self, message: records_pb2.TaskMessage, running: Running) -> None:
        start = now_utc()
        if not self._tasks.mark_running(message.tenant_id, message.task_id,
                                        lease_id=running.lease_id,
                                        attempt_number=message.attempt_number, start_time=start):
            return  # the lease moved on before we started: someone else runs it
        function = self._functions.get(message.tenant_id, message.function)
        outcome = self._execute(message, function, running.worker)
        end = now_utc()
        # The worker is free (or replaced) before the outcome is written: its next attempt
        # need not wait for Cassandra.
        self._done_with_worker(running, reusable=outcome.exit_reason not in (
            Exit.EXIT_REASON_TIMED_OUT, Exit.EXIT_REASON_WORKER_CRASHED))

        if running.cancelled:
            return  # CancelTask ended the task and took the lease: nothing more to record
        stored = self._tasks.get(message.tenant_id, message.task_id)
        if stored is None:
            return
        record = stored.record
        attempt = tasks_pb2.Attempt(
            attempt_number=len(record.task.attempts) + 1, executor_id=self.executor_id,
            dispatch_time=timestamp_of(running.dispatch_time), start_time=timestamp_of(start),
            end_time=timestamp_of(end),
            status=outcome.status or status_pb2.Status(code=code_pb2.OK),
            error_class=outcome.error_class, exit_reason=outcome.exit_reason)
        if outcome.retry_delay is not None:
            attempt.requested_retry_delay.CopyFrom(outcome.retry_delay)
        policy = RetryPolicy.of(function.retry_config if function else
                                common_pb2.RetryConfig(), record.task.retry_config)
        if self._lifecycle.end_attempt(record, attempt, lease_id=running.lease_id,
                                       policy=policy, result=outcome.result) is None:
            log.warning("late result rejected: the lease was taken over", extra={
                "tenant": message.tenant_id, "task_id": message.task_id})

    def _execute(self, message: records_pb2.TaskMessage,
                 function: functions_pb2.Function | None, worker: WorkerProcess) -> Outcome:
        if function is None:
            return Outcome(status=status_pb2.Status(
                code=code_pb2.NOT_FOUND, message=f"function {message.function!r} was deleted"),
                error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE,
                exit_reason=Exit.EXIT_REASON_RAISED)
        timeout = (function.timeout.ToTimedelta() if function.HasField("timeout")
                   else DEFAULT_TIMEOUT)
        request = worker_pb2.ExecuteRequest(
            attempt_id=f"{message.task_id}/{message.attempt_number}",
            tenant_id=message.tenant_id, task_id=message.task_id, function=message.function,
            handler=function.handler, payload=message.payload,
            attempt_number=message.attempt_number,
            deadline=timestamp_of(now_utc() + timeout))
        try:
            reply = worker.stub.Execute(request, timeout=timeout.total_seconds())
        except grpc.RpcError as error:
            return self._failed_call(error, timeout)
        except ValueError as error:  # its channel was closed under it: the worker was stopped
            return Outcome(status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(error)),
                           error_class=ErrorClass.ERROR_CLASS_RETRYABLE,
                           exit_reason=Exit.EXIT_REASON_WORKER_CRASHED)
        if reply.HasField("error"):
            return Outcome(status=reply.error.status,
                           error_class=reply.error.error_class or ErrorClass.ERROR_CLASS_RETRYABLE,
                           exit_reason=Exit.EXIT_REASON_RAISED,
                           retry_delay=reply.error.retry_delay
                           if reply.error.HasField("retry_delay") else None)
        return Outcome(result=reply.result)

    def _failed_call(self, error: grpc.RpcError, timeout: timedelta) -> Outcome:
        code = error.code()
        if code == grpc.StatusCode.NOT_FOUND:  # the handler cannot be imported
            return Outcome(status=status_pb2.Status(code=code_pb2.NOT_FOUND,
                                                    message=error.details()),
                           error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE,
                           exit_reason=Exit.EXIT_REASON_RAISED)
        # A stuck or dead worker: the caller replaces it; only a fresh process is sure to be
        # clean.
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome(status=status_pb2.Status(
                code=code_pb2.DEADLINE_EXCEEDED,
                message=f"ran longer than the timeout of {timeout.total_seconds():g}s"),
                error_class=ErrorClass.ERROR_CLASS_RETRYABLE,
                exit_reason=Exit.EXIT_REASON_TIMED_OUT)
        return Outcome(status=status_pb2.Status(
            code=code_pb2.UNAVAILABLE, message=f"the worker process died: {error.details()}"),
            error_class=ErrorClass.ERROR_CLASS_RETRYABLE,
            exit_reason=Exit.EXIT_REASON_WORKER_CRASHED)
