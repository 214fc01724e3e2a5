"""The Python worker runtime: serves the worker protocol (weir.worker.v1.WorkerService).

The executor-manager starts ``python -m libs.sdk.worker --address unix:///…/worker-0.sock
--handler-packages examples,tests.handlers --slots 8``, writes a fresh random token as the
first line of its stdin, waits for its health check, then opens one ``Run`` stream carrying
``authorization: Bearer <token>``: it sends batches of attempts and reads back batches of
starts and ends. The token travels on stdin because argv and the environment of a process
are readable by every other process of its user (/proc/<pid>/cmdline, environ). Health
checks need no token. An end carries what the handler wrote while it ran — stdout, stderr
and `logging` records, captured per attempt and capped at ``--log-max-bytes``
(`libs.sdk.capture`).

Attempts run in ``--slots`` long-lived threads (no thread per attempt), at most
``max_concurrency`` of one function at once, each in a fresh `contextvars.Context` so
`sdk.current_attempt()` is the attempt's own. Handlers are imported on first use from their
``package.module:function`` reference, and only from the allowed packages and when marked with
``@sdk.task`` (`libs.sdk.handlers.load_handler`); any other ends its attempt NON_RETRYABLE
NOT_FOUND before anything of it runs. Updates ready within about a millisecond of each other
share one message. Deadlines are the executor-manager's to enforce: it kills the process.
"""

from __future__ import annotations

import argparse
import contextvars
import ctypes
import hmac
import logging
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from weir.v1 import common_pb2
from weir.worker.v1 import worker_pb2, worker_pb2_grpc

from libs.sdk.capture import (
    DEFAULT_MAX_BYTES as DEFAULT_LOG_MAX_BYTES,
    MIN_MAX_BYTES as MIN_LOG_MAX_BYTES,
    CappedText,
    Captured,
    capturing,
    install as install_capture,
)
from libs.sdk.handlers import (
    Attempt,
    Handler,
    HandlerError,
    HandlerRefused,
    encode_result,
    handler_packages,
    load_handler,
    running,
)

log = logging.getLogger(__name__)

ErrorClass = common_pb2.ErrorClass
CLASSES = {"NON_RETRYABLE": ErrorClass.ERROR_CLASS_NON_RETRYABLE,
           "RETRYABLE": ErrorClass.ERROR_CLASS_RETRYABLE,
           "THROTTLED": ErrorClass.ERROR_CLASS_THROTTLED}
CODES = {"NON_RETRYABLE": code_pb2.FAILED_PRECONDITION, "RETRYABLE": code_pb2.UNAVAILABLE,
         "THROTTLED": code_pb2.RESOURCE_EXHAUSTED}
MAX_TRACEBACK = 16 * 1024
# A result travels in batched messages (the worker's stream, the executor's reports, an
# outcomes record on Kafka) and is stored with the task: like a payload, at most 1 MiB. A
# larger one ends its attempt instead of breaking the stream other attempts share.
MAX_RESULT_BYTES = 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024  # results per message, beyond which a batch is split
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # what either side of the stream accepts
LINGER_SECONDS = 0.001  # how long an update waits for others to share its message
OPEN_METHODS = "/grpc.health.v1.Health/"  # the pool polls health before it holds a channel
PR_SET_DUMPABLE = 4
NANOS = 1_000_000_000


def handler_error(exc: BaseException) -> worker_pb2.HandlerError:
    """The outcome of a handler that raised ``exc`` (called inside its ``except``)."""
    trace = traceback.format_exc()[-MAX_TRACEBACK:]
    if isinstance(exc, HandlerError):
        error = worker_pb2.HandlerError(
            error_class=CLASSES[exc.error_class],
            status=status_pb2.Status(code=CODES[exc.error_class], message=str(exc)),
            traceback=trace)
        if exc.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromTimedelta(exc.retry_after)
            error.retry_delay.CopyFrom(delay)
        return error
    return worker_pb2.HandlerError(
        error_class=ErrorClass.ERROR_CLASS_RETRYABLE,
        status=status_pb2.Status(code=code_pb2.UNKNOWN, message=f"{type(exc).__name__}: {exc}"),
        traceback=trace)


def refused(exc: HandlerRefused) -> worker_pb2.HandlerError:
    """The outcome of an attempt whose handler may not run: NOT_FOUND, never retried."""
    return worker_pb2.HandlerError(error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE,
                                   status=status_pb2.Status(code=code_pb2.NOT_FOUND,
                                                            message=str(exc)))


def run_handler(handler: Handler, payload: bytes, attempt: Attempt | None = None, *,
                log: CappedText | None = None) -> bytes | worker_pb2.HandlerError:
    """Calls a handler and turns what it returned or raised into the attempt's outcome.

    Args:
        log: where what the handler writes goes (`libs.sdk.capture`); a traceback ends it
            when the handler raised, as Python prints one for an uncaught exception.

    Returns:
        The result bytes, or the error to report.
    """
    try:
        with running(attempt), capturing(log) if log is not None else nullcontext():
            result = encode_result(handler(payload))
    # BaseException: a handler's SystemExit must end its attempt, not the slot's thread.
    except BaseException as exc:
        if log is not None:
            log.write(traceback.format_exc())
        return handler_error(exc)
    if len(result) > MAX_RESULT_BYTES:
        return worker_pb2.HandlerError(
            error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE,
            status=status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED,
                message=f"the handler returned {len(result):,} bytes; a result is at most "
                f"{MAX_RESULT_BYTES:,}"))
    return result


class Outbox:
    """One Run stream's updates waiting to be sent, and the attempts it holds.

    Slot threads record starts and ends; the stream's response generator takes them in
    batches (`take`). An attempt's start and end that are taken together travel as one
    update.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition(threading.Lock())
        # attempt_id → [start ns, end ns (0 while running), result, error, log]; dicts keep
        # the order updates happened in.
        self._updates: dict[str, list[Any]] = {}
        self._held: set[str] = set()  # accepted and not ended
        self._closing = False  # the caller half-closed: end once nothing is held
        self.problem: str | None = None  # a protocol error that ends the stream
        self.cancelled = False

    def accept(self, attempt_ids: Iterable[str]) -> str | None:
        """Holds the attempts, or says why the batch breaks the protocol."""
        with self._ready:
            batch: set[str] = set()
            for attempt_id in attempt_ids:
                if not attempt_id:
                    return "an attempt without attempt_id"
                if attempt_id in self._held or attempt_id in batch:
                    return f"attempt_id {attempt_id!r} is already held by this worker"
                batch.add(attempt_id)
            self._held |= batch
        return None

    def started(self, attempt_id: str, start_ns: int) -> None:
        with self._ready:
            if not self._updates:
                self._ready.notify()
            self._updates[attempt_id] = [start_ns, 0, b"", None, None]

    def ended(self, attempt_id: str, start_ns: int, end_ns: int,
              outcome: bytes | worker_pb2.HandlerError, log: Captured | None = None) -> None:
        with self._ready:
            wake = not self._updates
            if isinstance(outcome, bytes):
                self._updates[attempt_id] = [start_ns, end_ns, outcome, None, log]
            else:
                self._updates[attempt_id] = [start_ns, end_ns, b"", outcome, log]
            self._held.discard(attempt_id)
            # The generator lingers while attempts run; once none does, waiting is pointless.
            if wake or not self._held:
                self._ready.notify()

    def close(self, problem: str | None = None) -> None:
        """No more attempts will come: the caller half-closed, or broke the protocol."""
        with self._ready:
            self._closing = True
            self.problem = problem
            self._ready.notify()

    def cancel(self) -> None:
        """The call is over (the caller left): nothing more is sent."""
        with self._ready:
            self.cancelled = True
            self._ready.notify()

    def take(self) -> dict[str, list[Any]] | None:
        """Waits for updates and returns them, lingering briefly while attempts still run so
        that more share the message; None once the stream is to end."""
        with self._ready:
            while not self._updates:
                if self.cancelled or self.problem or (self._closing and not self._held):
                    return None
                self._ready.wait()
            if self._held and not self.cancelled:
                self._ready.wait(LINGER_SECONDS)
            batch, self._updates = self._updates, {}
            return batch


class Job:
    """An attempt accepted from a stream, waiting for or holding a slot."""

    __slots__ = ("assignment", "key", "limit", "outbox")

    def __init__(self, assignment: worker_pb2.AttemptAssignment, limit: int,
                 outbox: Outbox) -> None:
        self.assignment = assignment
        self.key = (assignment.tenant_id, assignment.function)
        self.limit = limit
        self.outbox = outbox


class Slots:
    """A fixed set of threads running jobs in arrival order, at most ``job.limit`` of one
    function at once: a job whose function is at its limit waits, later ones may pass it."""

    def __init__(self, count: int, run: Callable[[Job], None]) -> None:
        """Starts ``count`` threads that call ``run`` (which must not raise) for each job."""
        self._ready = threading.Condition(threading.Lock())
        self._pending: deque[Job] = deque()
        self._running: dict[tuple[str, str], int] = {}
        self._run = run
        self._threads = [threading.Thread(target=self._serve, name=f"slot-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._ready:
            self._pending.extend(jobs)
            # As many threads as jobs at once: measured cheaper than waking them one by one
            # (each woken thread waking the next), which serialises the hand-offs.
            self._ready.notify(len(jobs))

    def drop(self, outbox: Outbox) -> None:
        """Forgets the jobs of a stream that ended and have not started."""
        with self._ready:
            self._pending = deque(job for job in self._pending if job.outbox is not outbox)

    def _next(self) -> Job | None:
        pending = self._pending
        if not pending:
            return None
        running = self._running
        head = pending[0]
        if running.get(head.key, 0) < head.limit:
            return pending.popleft()
        for index, job in enumerate(pending):
            if running.get(job.key, 0) < job.limit:
                del pending[index]
                return job
        return None

    def _serve(self) -> None:
        job: Job | None = None
        while True:
            with self._ready:
                if job is not None:
                    left = self._running[job.key] - 1
                    if left:
                        self._running[job.key] = left
                    else:
                        del self._running[job.key]
                job = self._next()
                while job is None:
                    self._ready.wait()
                    job = self._next()
                self._running[job.key] = self._running.get(job.key, 0) + 1
            self._run(job)


def deadline_of(start_ns: int, timeout: duration_pb2.Duration) -> datetime:
    seconds, nanos = divmod(start_ns, NANOS)
    return (datetime.fromtimestamp(seconds, UTC)
            + timedelta(seconds=timeout.seconds, microseconds=(nanos + timeout.nanos) // 1000))


class Worker(worker_pb2_grpc.WorkerServiceServicer):
    """Runs attempts of any number of Run streams in ``slots`` threads; what each attempt
    writes is captured into a log of at most ``log_max_bytes`` (once `libs.sdk.capture` is
    installed, as `serve` does)."""

    def __init__(self, *, allowed_packages: Sequence[str], slots: int = 1,
                 log_max_bytes: int = DEFAULT_LOG_MAX_BYTES) -> None:
        self._allowed = tuple(allowed_packages)
        self._log_max_bytes = log_max_bytes
        self._handlers: dict[str, Handler] = {}
        self._slot_count = slots
        self._slots = Slots(slots, self._run)

    def Describe(self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext
                 ) -> worker_pb2.DescribeResponse:
        return worker_pb2.DescribeResponse(handlers=sorted(self._handlers),
                                           max_concurrency=self._slot_count,
                                           runtime=f"python {platform.python_version()}")

    def Run(self, request_iterator: Iterator[worker_pb2.RunRequest],
            context: grpc.ServicerContext) -> Iterator[worker_pb2.RunResponse]:
        outbox = Outbox()

        def ended() -> None:
            outbox.cancel()
            self._slots.drop(outbox)

        context.add_callback(ended)
        # Reading needs a thread of its own: this one sends as attempts end.
        threading.Thread(target=self._read, args=(request_iterator, outbox), name="run-reader",
                         daemon=True).start()
        while (batch := outbox.take()) is not None:
            yield from responses(batch)
        if outbox.problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, outbox.problem)

    def _read(self, requests: Iterator[worker_pb2.RunRequest], outbox: Outbox) -> None:
        try:
            for request in requests:
                attempts = request.attempts
                problem = outbox.accept(a.attempt_id for a in attempts)
                if problem is not None:
                    outbox.close(problem)
                    return
                slots = self._slot_count
                self._slots.submit([Job(a, a.max_concurrency or slots, outbox)
                                    for a in attempts])
        except grpc.RpcError:
            outbox.cancel()  # the caller went away
            return
        outbox.close()

    def _run(self, job: Job) -> None:
        assignment = job.assignment
        start = time.time_ns()
        output = CappedText(self._log_max_bytes)
        try:
            job.outbox.started(assignment.attempt_id, start)
            outcome = self._call(assignment, start, output)
        except Exception as exc:  # a bug of ours: the attempt must end all the same
            log.exception("running an attempt failed")
            outcome = handler_error(exc)
        job.outbox.ended(assignment.attempt_id, start, time.time_ns(), outcome,
                         output.captured())

    def _call(self, assignment: worker_pb2.AttemptAssignment, start_ns: int,
              output: CappedText | None = None) -> bytes | worker_pb2.HandlerError:
        handler = self._handlers.get(assignment.handler)
        if handler is None:
            try:
                handler = load_handler(assignment.handler, self._allowed)
            except HandlerRefused as exc:
                return refused(exc)
            self._handlers[assignment.handler] = handler
        attempt = Attempt(
            tenant_id=assignment.tenant_id, task_id=assignment.task_id,
            function=assignment.function, attempt_number=assignment.attempt_number,
            deadline=deadline_of(start_ns, assignment.timeout)
            if assignment.HasField("timeout") else None,
            trace_context=dict(assignment.trace_context))
        # A fresh context per attempt: what one handler sets in a ContextVar is not seen by
        # the next attempt of the same slot thread.
        return contextvars.Context().run(run_handler, handler, assignment.payload, attempt,
                                         log=output)


def responses(batch: dict[str, list[Any]]) -> Iterator[worker_pb2.RunResponse]:
    """The updates as messages, split so that none carries much more than BATCH_BYTES."""
    response = worker_pb2.RunResponse()
    add = response.updates.add
    size = 0
    for attempt_id, (start, end, result, error, output) in batch.items():
        if size > BATCH_BYTES:
            yield response
            response = worker_pb2.RunResponse()
            add = response.updates.add
            size = 0
        update = add(attempt_id=attempt_id)
        update.start_time.seconds, update.start_time.nanos = divmod(start, NANOS)
        if end:
            update.end_time.seconds, update.end_time.nanos = divmod(end, NANOS)
            if error is None:
                update.result = result
                size += len(result)
            else:
                update.error.CopyFrom(error)
            if output is not None and output.original_bytes:
                update.log.text = output.text
                update.log.truncated = output.truncated
                update.log.original_bytes = output.original_bytes
                size += len(output.text)
    yield response


class BearerToken(grpc.ServerInterceptor):
    """Admits a call only with ``authorization: Bearer <token>`` (health checks excepted), so
    no other local process can run handlers or read payloads through the worker's socket."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    @staticmethod
    def _unauthenticated(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "the worker protocol needs 'authorization: Bearer <token>' with the "
                      "token its executor-manager handed over")

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = str(metadata.get("authorization", "")).encode()
        # Constant time: the comparison must not tell a guesser how much of the token matched.
        if hmac.compare_digest(presented, self._expected):
            return continuation(handler_call_details)
        # A refusal of the method's own shape: a unary refusal of a streaming call would
        # wait for a request the caller may never send.
        method = continuation(handler_call_details)
        if method is not None and method.request_streaming and method.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._unauthenticated)
        return grpc.unary_unary_rpc_method_handler(self._unauthenticated)


def exit_with_parent(parent_pid: int, stopping: threading.Event) -> None:
    """Stops the worker once its executor-manager is gone (even killed with -9): an orphan
    worker would hold a slot nobody can use."""
    while not stopping.wait(1.0):
        if os.getppid() != parent_pid:
            stopping.set()


def make_undumpable() -> None:
    """Sibling workers share a user: without this, one tenant's handler could ptrace another
    worker (or read its /proc/<pid>/mem) and take that worker's token and payloads."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def serve(address: str, *, token: str, allowed_packages: Sequence[str], slots: int = 1,
          parent_pid: int | None = None, log_max_bytes: int = DEFAULT_LOG_MAX_BYTES) -> None:
    """Serves the worker protocol on ``address`` until SIGTERM or the parent's exit.

    Args:
        address: e.g. ``unix:///tmp/weir-workers-x/worker-0/worker.sock``.
        token: the secret every WorkerService call must present as a bearer token.
        allowed_packages: packages whose marked functions may run (the handler_packages
            setting).
        slots: attempts run at once (threads).
        parent_pid: the executor-manager's pid; the worker exits when it is gone.
        log_max_bytes: the cap of each attempt's captured output.
    """
    install_capture()
    # Threads for calls, not attempts: the Run stream, Describe and health checks.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[BearerToken(token)],
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(
        Worker(allowed_packages=allowed_packages, slots=slots, log_max_bytes=log_max_bytes),
        server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    if parent_pid is not None:
        threading.Thread(target=exit_with_parent, args=(parent_pid, stopping),
                         daemon=True).start()
    stopping.wait()
    server.stop(5).wait()


def read_token() -> str:
    """The first line of stdin: the token the executor-manager generated for this process."""
    token = sys.stdin.readline().strip()
    if len(token) < 32:
        raise SystemExit("worker: expected a token of at least 32 characters on stdin")
    return token


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def log_cap(text: str) -> int:
    value = int(text)
    if value < MIN_LOG_MAX_BYTES:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LOG_MAX_BYTES}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Weir's Python worker runtime. Reads its token from the first line of "
        "stdin.")
    parser.add_argument("--address", required=True, help="e.g. unix:///tmp/worker-0.sock")
    parser.add_argument("--handler-packages", required=True,
                        help="packages whose @sdk.task functions may run, comma-separated")
    parser.add_argument("--slots", type=positive, default=1,
                        help="attempts run at once, each in a thread of its own (default 1)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--log-max-bytes", type=log_cap, default=DEFAULT_LOG_MAX_BYTES,
                        help="cap of each attempt's captured output, in bytes of UTF-8 "
                        f"(default {DEFAULT_LOG_MAX_BYTES}); past it the head and the tail "
                        "are kept")
    args = parser.parse_args()
    make_undumpable()
    serve(args.address, token=read_token(),
          allowed_packages=handler_packages(args.handler_packages), slots=args.slots,
          parent_pid=args.parent_pid, log_max_bytes=args.log_max_bytes)


if __name__ == "__main__":
    main()
