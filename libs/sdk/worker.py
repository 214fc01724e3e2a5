"""The Python worker runtime: serves the worker protocol (weir.v1.WorkerService) for handlers.

The executor-manager starts ``python -m libs.sdk.worker --address unix:///…/worker-0.sock
--handler-packages examples,tests.handlers``, writes a fresh random token as the first line of
its stdin, waits for its health check, then sends one Execute at a time, each carrying
``authorization: Bearer <token>``. The token travels on stdin because argv and the environment
of a process are readable by every other process of its user (/proc/<pid>/cmdline, environ).
Health checks need no token. Handlers are imported on first use from their
``package.module:function`` reference, and only from the allowed packages and when marked with
``@sdk.task`` (`libs.sdk.handlers.load_handler`); any other is refused with NOT_FOUND before
anything of it runs.
"""

from __future__ import annotations

import argparse
import ctypes
import hmac
import os
import platform
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent import futures
from datetime import UTC
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from weir.v1 import common_pb2, worker_pb2, worker_pb2_grpc

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

ErrorClass = common_pb2.ErrorClass
CLASSES = {"NON_RETRYABLE": ErrorClass.ERROR_CLASS_NON_RETRYABLE,
           "RETRYABLE": ErrorClass.ERROR_CLASS_RETRYABLE,
           "THROTTLED": ErrorClass.ERROR_CLASS_THROTTLED}
CODES = {"NON_RETRYABLE": code_pb2.FAILED_PRECONDITION, "RETRYABLE": code_pb2.UNAVAILABLE,
         "THROTTLED": code_pb2.RESOURCE_EXHAUSTED}
MAX_TRACEBACK = 16 * 1024
OPEN_METHODS = "/grpc.health.v1.Health/"  # the pool polls health before it holds a channel
PR_SET_DUMPABLE = 4


def run_handler(handler: Handler, payload: bytes, attempt: Attempt | None = None
                ) -> worker_pb2.ExecuteResponse:
    """Calls a handler and turns what it returned or raised into the attempt's outcome."""
    try:
        with running(attempt):
            return worker_pb2.ExecuteResponse(result=encode_result(handler(payload)))
    except HandlerError as exc:
        error = worker_pb2.HandlerError(
            error_class=CLASSES[exc.error_class],
            status=status_pb2.Status(code=CODES[exc.error_class], message=str(exc)),
            traceback=traceback.format_exc()[-MAX_TRACEBACK:])
        if exc.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromTimedelta(exc.retry_after)
            error.retry_delay.CopyFrom(delay)
        return worker_pb2.ExecuteResponse(error=error)
    except Exception as exc:
        return worker_pb2.ExecuteResponse(error=worker_pb2.HandlerError(
            error_class=ErrorClass.ERROR_CLASS_RETRYABLE,
            status=status_pb2.Status(code=code_pb2.UNKNOWN,
                                     message=f"{type(exc).__name__}: {exc}"),
            traceback=traceback.format_exc()[-MAX_TRACEBACK:]))


class BearerToken(grpc.ServerInterceptor):
    """Admits a call only with ``authorization: Bearer <token>`` (health checks excepted), so
    no other local process can run handlers or read payloads through the worker's socket."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._refuse = grpc.unary_unary_rpc_method_handler(self._unauthenticated)

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
        return self._refuse


class Worker(worker_pb2_grpc.WorkerServiceServicer):
    """Runs one attempt at a time (one process, one slot: isolation is the process)."""

    def __init__(self, *, allowed_packages: Sequence[str]) -> None:
        self._allowed = tuple(allowed_packages)
        self._handlers: dict[str, Handler] = {}
        self._busy = threading.Lock()

    def Describe(self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext
                 ) -> worker_pb2.DescribeResponse:
        return worker_pb2.DescribeResponse(handlers=sorted(self._handlers), max_concurrency=1,
                                           runtime=f"python {platform.python_version()}")

    def Execute(self, request: worker_pb2.ExecuteRequest, context: grpc.ServicerContext
                ) -> worker_pb2.ExecuteResponse:
        if not self._busy.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this worker is busy")
        try:
            handler = self._handlers.get(request.handler)
            if handler is None:
                try:
                    handler = load_handler(request.handler, self._allowed)
                except HandlerRefused as exc:
                    # NOT_FOUND: the executor-manager fails the task for good, with this text.
                    context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                self._handlers[request.handler] = handler
            return run_handler(handler, request.payload, Attempt(
                tenant_id=request.tenant_id, task_id=request.task_id, function=request.function,
                attempt_number=request.attempt_number,
                deadline=request.deadline.ToDatetime(tzinfo=UTC)
                if request.HasField("deadline") else None))
        finally:
            self._busy.release()


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


def serve(address: str, *, token: str, allowed_packages: Sequence[str],
          parent_pid: int | None = None) -> None:
    """Serves the worker protocol on ``address`` until SIGTERM or the parent's exit.

    Args:
        address: e.g. ``unix:///tmp/weir-workers-x/worker-0/worker.sock``.
        token: the secret every WorkerService call must present as a bearer token.
        allowed_packages: packages whose marked functions may run (the handler_packages
            setting).
        parent_pid: the executor-manager's pid; the worker exits when it is gone.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[BearerToken(token)])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(
        Worker(allowed_packages=allowed_packages), server)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Weir's Python worker runtime. Reads its token from the first line of "
        "stdin.")
    parser.add_argument("--address", required=True, help="e.g. unix:///tmp/worker-0.sock")
    parser.add_argument("--handler-packages", required=True,
                        help="packages whose @sdk.task functions may run, comma-separated")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args()
    make_undumpable()
    serve(args.address, token=read_token(),
          allowed_packages=handler_packages(args.handler_packages), parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
