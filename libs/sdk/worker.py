"""The Python worker runtime: serves the worker protocol (weir.v1.WorkerService) for handlers.

The executor-manager starts ``python -m libs.sdk.worker --address unix:///…/worker-0.sock``,
waits for its health check, then sends one Execute at a time. Handlers are imported on first
use from their ``package.module:function`` reference.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import threading
import traceback
from concurrent import futures
from datetime import UTC

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from weir.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from libs.sdk.handlers import Attempt, Handler, HandlerError, encode_result, load_handler, running

ErrorClass = common_pb2.ErrorClass
CLASSES = {"NON_RETRYABLE": ErrorClass.ERROR_CLASS_NON_RETRYABLE,
           "RETRYABLE": ErrorClass.ERROR_CLASS_RETRYABLE,
           "THROTTLED": ErrorClass.ERROR_CLASS_THROTTLED}
CODES = {"NON_RETRYABLE": code_pb2.FAILED_PRECONDITION, "RETRYABLE": code_pb2.UNAVAILABLE,
         "THROTTLED": code_pb2.RESOURCE_EXHAUSTED}
MAX_TRACEBACK = 16 * 1024


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


class Worker(worker_pb2_grpc.WorkerServiceServicer):
    """Runs one attempt at a time (one process, one slot: isolation is the process)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._busy = threading.Lock()

    def Describe(self, request, context):
        return worker_pb2.DescribeResponse(handlers=sorted(self._handlers), max_concurrency=1,
                                           runtime=f"python {platform.python_version()}")

    def Execute(self, request, context):
        if not self._busy.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this worker is busy")
        try:
            handler = self._handlers.get(request.handler)
            if handler is None:
                try:
                    handler = self._handlers[request.handler] = load_handler(request.handler)
                except (ImportError, AttributeError, ValueError) as exc:
                    context.abort(grpc.StatusCode.NOT_FOUND,
                                  f"cannot load handler {request.handler!r}: {exc}")
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


def serve(address: str, parent_pid: int | None = None) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(Worker(), server)
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Weir's Python worker runtime.")
    parser.add_argument("--address", required=True, help="e.g. unix:///tmp/worker-0.sock")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args()
    serve(args.address, args.parent_pid)


if __name__ == "__main__":
    main()
