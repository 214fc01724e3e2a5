"""The Python client of the public weir.v1 API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2
from weir.v1 import (
    dead_letters_pb2,
    dead_letters_pb2_grpc,
    functions_pb2,
    functions_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

from libs import tracing
from libs.errors import from_rpc_error

FINAL = {tasks_pb2.TaskState.TASK_STATE_SUCCEEDED, tasks_pb2.TaskState.TASK_STATE_FAILED,
         tasks_pb2.TaskState.TASK_STATE_CANCELLED, tasks_pb2.TaskState.TASK_STATE_EXPIRED}
BATCH_LIMIT = 1000
WAIT_CALL_SECONDS = 50.0  # one WaitOperation call's wait: under the server's 60 s bound
OPERATION_FINAL = {operations_pb2.OperationState.OPERATION_STATE_SUCCEEDED,
                   operations_pb2.OperationState.OPERATION_STATE_FAILED,
                   operations_pb2.OperationState.OPERATION_STATE_CANCELLED}

# Reads are idempotent: gRPC retries them by itself when a server is briefly unavailable.
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "weir.v1.TaskService", "method": m}
             for m in ("GetTask", "ListTasks", "GetAttemptLog", "ListAttemptLogs")]
    + [{"service": "weir.v1.FunctionService", "method": m}
       for m in ("GetFunction", "ListFunctions")]
    + [{"service": "weir.v1.DeadLetterService", "method": m}
       for m in ("GetDeadLetter", "ListDeadLetters")]
    + [{"service": "weir.v1.OperationService", "method": m}
       for m in ("GetOperation", "ListOperations", "WaitOperation")],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


class TaskFailed(Exception):
    """A waited-for task ended in a state other than SUCCEEDED."""

    def __init__(self, task: tasks_pb2.Task) -> None:
        super().__init__(f"task {task.task_id} ended {tasks_pb2.TaskState.Name(task.state)}: "
                         f"{task.last_status.message}")
        self.task = task


class Client:
    """Submits tasks and reads them back. Errors are raised as `libs.errors.WeirError`s.

    Args:
        address: the gateway, ``host:port``.
        api_key: the tenant's API key.
        timeout: deadline of each call, in seconds.
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str,
                 timeout: float = 10.0) -> None:
        # Calls carry the application's current trace (when it uses OpenTelemetry): a task
        # created inside a span joins that trace.
        self._channel = tracing.instrument_channel(grpc.insecure_channel(address, options=[
            ("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]))
        self._tasks = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._functions = functions_pb2_grpc.FunctionServiceStub(self._channel)
        self._dead_letters = dead_letters_pb2_grpc.DeadLetterServiceStub(self._channel)
        self._operations = operations_pb2_grpc.OperationServiceStub(self._channel)
        self._tenants = tenants_pb2_grpc.TenantServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {api_key}")]
        self._timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def create_task(self, function: str, payload: bytes = b"", *, task_id: str = "",
                    request_id: str = "", delay: timedelta | None = None,
                    **fields: Any) -> tasks_pb2.Task:
        """Submits one task; ``fields`` are further `weir.v1.Task` fields (priority, labels,
        schedule_time, max_age, retry_config…). ``delay`` sets `schedule_time` to now + it."""
        task = tasks_pb2.Task(function=function, payload=payload, task_id=task_id, **fields)
        if delay is not None:
            task.schedule_time.FromDatetime(datetime.now(UTC) + delay)
        return self._call(self._tasks.CreateTask,
                          tasks_pb2.CreateTaskRequest(task=task, request_id=request_id))

    def create_tasks(self, tasks: Iterable[tasks_pb2.Task | Mapping[str, Any]]
                     ) -> list[tasks_pb2.BatchCreateTaskResult]:
        """Submits many tasks, 1,000 per call; one result per task, in order."""
        requests = [tasks_pb2.CreateTaskRequest(
            task=t if isinstance(t, tasks_pb2.Task) else tasks_pb2.Task(**t)) for t in tasks]
        results = []
        for start in range(0, len(requests), BATCH_LIMIT):
            reply = self._call(self._tasks.BatchCreateTasks, tasks_pb2.BatchCreateTasksRequest(
                requests=requests[start:start + BATCH_LIMIT]))
            results.extend(reply.results)
        return results

    def get_task(self, task_id: str, *, full: bool = True) -> tasks_pb2.Task:
        view = tasks_pb2.TaskView.TASK_VIEW_FULL if full else tasks_pb2.TaskView.TASK_VIEW_BASIC
        return self._call(self._tasks.GetTask, tasks_pb2.GetTaskRequest(task_id=task_id,
                                                                        view=view))

    def list_tasks(self, filter: str = "", *, page_size: int = 100) -> Iterator[tasks_pb2.Task]:
        """Every task matching ``filter`` (see ListTasksRequest), newest first, page by page."""
        return self._pages(self._tasks.ListTasks, tasks_pb2.ListTasksRequest(
            filter=filter, page_size=page_size), "tasks")

    def get_attempt_log(self, task_id: str, attempt_number: int) -> tasks_pb2.AttemptLog:
        """What attempt ``attempt_number`` (1 for the first) of a task wrote: its stdout,
        stderr and logging records, capped (``truncated`` says whether the middle was
        dropped). An attempt with nothing stored gives an empty log; see docs/attempt-logs.md.
        """
        return self._call(self._tasks.GetAttemptLog, tasks_pb2.GetAttemptLogRequest(
            task_id=task_id, attempt_number=attempt_number))

    def list_attempt_logs(self, task_id: str, *, page_size: int = 0
                          ) -> Iterator[tasks_pb2.AttemptLog]:
        """The logs of every attempt of a task so far, oldest first, page by page
        (``page_size`` 0: the server's default, 10)."""
        return self._pages(self._tasks.ListAttemptLogs, tasks_pb2.ListAttemptLogsRequest(
            task_id=task_id, page_size=page_size), "attempt_logs")

    def cancel_task(self, task_id: str, *, reason: str = "") -> tasks_pb2.Task:
        return self._call(self._tasks.CancelTask, tasks_pb2.CancelTaskRequest(
            task_id=task_id, reason=reason))

    def delete_task(self, task_id: str) -> None:
        self._call(self._tasks.DeleteTask, tasks_pb2.DeleteTaskRequest(task_id=task_id))

    def batch_cancel_tasks(self, filter: str, *, request_id: str = ""
                           ) -> operations_pb2.Operation:
        return self._call(self._tasks.BatchCancelTasks, tasks_pb2.BatchCancelTasksRequest(
            filter=filter, request_id=request_id))

    def batch_delete_tasks(self, filter: str, *, request_id: str = ""
                           ) -> operations_pb2.Operation:
        return self._call(self._tasks.BatchDeleteTasks, tasks_pb2.BatchDeleteTasksRequest(
            filter=filter, request_id=request_id))

    def watch(self, task_id: str, *, timeout: float = 60.0
              ) -> Iterator[tasks_pb2.WatchTaskResponse]:
        """The task's state changes as they happen, until a final one."""
        try:
            yield from self._tasks.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id),
                                             timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def wait(self, task_id: str, *, timeout: float = 60.0, check: bool = False
             ) -> tasks_pb2.Task:
        """Blocks until the task reaches a final state and returns it (FULL view).

        With ``check``, raises `TaskFailed` unless it SUCCEEDED.
        """
        for change in self.watch(task_id, timeout=timeout):
            if change.stage.state in FINAL:
                break
        task = self.get_task(task_id)
        if check and task.state != tasks_pb2.TaskState.TASK_STATE_SUCCEEDED:
            raise TaskFailed(task)
        return task

    def create_function(self, name: str, handler: str, *, timeout: timedelta | None = None,
                        **fields: Any) -> functions_pb2.Function:
        function = functions_pb2.Function(name=name, handler=handler, **fields)
        if timeout is not None:
            function.timeout.CopyFrom(duration_pb2.Duration(
                seconds=int(timeout.total_seconds()), nanos=timeout.microseconds * 1000))
        return self._call(self._functions.CreateFunction,
                          functions_pb2.CreateFunctionRequest(function=function))

    def get_tenant(self) -> tenants_pb2.Tenant:
        """The caller's own tenant, with the limits the operator set over all its functions."""
        return self._call(self._tenants.GetTenant, tenants_pb2.GetTenantRequest())

    def list_functions(self, *, page_size: int = 100) -> Iterator[functions_pb2.Function]:
        """The tenant's functions by name, page by page."""
        return self._pages(self._functions.ListFunctions,
                           functions_pb2.ListFunctionsRequest(page_size=page_size), "functions")

    def get_function(self, name: str) -> functions_pb2.Function:
        return self._call(self._functions.GetFunction, functions_pb2.GetFunctionRequest(name=name))

    def delete_function(self, name: str, *, force: bool = False) -> operations_pb2.Operation:
        """Deletes a function (see DeleteFunction); ``force`` cancels its unfinished tasks
        first. Returns the operation (`wait_operation` follows it)."""
        return self._call(self._functions.DeleteFunction,
                          functions_pb2.DeleteFunctionRequest(name=name, force=force))

    def update_function(self, function: functions_pb2.Function, paths: Iterable[str]
                        ) -> functions_pb2.Function:
        """Changes the fields of ``function`` named in ``paths`` (e.g. ``["timeout"]``); the
        function is selected by its ``name``."""
        request = functions_pb2.UpdateFunctionRequest(function=function)
        request.update_mask.paths.extend(paths)
        return self._call(self._functions.UpdateFunction, request)

    def pause_function(self, name: str) -> functions_pb2.Function:
        return self._call(self._functions.PauseFunction,
                          functions_pb2.PauseFunctionRequest(name=name))

    def resume_function(self, name: str) -> functions_pb2.Function:
        return self._call(self._functions.ResumeFunction,
                          functions_pb2.ResumeFunctionRequest(name=name))

    def get_dead_letter(self, task_id: str) -> dead_letters_pb2.DeadLetter:
        return self._call(self._dead_letters.GetDeadLetter,
                          dead_letters_pb2.GetDeadLetterRequest(task_id=task_id))

    def list_dead_letters(self, filter: str = "", *, page_size: int = 100
                          ) -> Iterator[dead_letters_pb2.DeadLetter]:
        return self._pages(self._dead_letters.ListDeadLetters,
                           dead_letters_pb2.ListDeadLettersRequest(
                               filter=filter, page_size=page_size), "dead_letters")

    def redrive_dead_letters(self, task_ids: Iterable[str] = (), *, filter: str = "",
                             payload_override: bytes | None = None,
                             per_second: float = 0) -> operations_pb2.Operation:
        """Re-drives dead letters by ID or filter, optionally with a corrected payload."""
        request = dead_letters_pb2.RedriveDeadLettersRequest(
            task_ids=list(task_ids), filter=filter, max_redrives_per_second=per_second)
        if payload_override is not None:
            request.payload_override = payload_override
        return self._call(self._dead_letters.RedriveDeadLetters, request)

    def get_operation(self, name: str) -> operations_pb2.Operation:
        return self._call(self._operations.GetOperation,
                          operations_pb2.GetOperationRequest(name=name))

    def cancel_operation(self, name: str) -> operations_pb2.Operation:
        return self._call(self._operations.CancelOperation,
                          operations_pb2.CancelOperationRequest(name=name))

    def list_operations(self, *, page_size: int = 100) -> Iterator[operations_pb2.Operation]:
        """The tenant's operations, newest first, page by page."""
        return self._pages(self._operations.ListOperations,
                           operations_pb2.ListOperationsRequest(page_size=page_size),
                           "operations")

    def wait_operation(self, name: str, *, timeout: float = 300.0) -> operations_pb2.Operation:
        """Blocks until an operation ends (or ``timeout`` passes) and returns it.

        One WaitOperation call per at most `WAIT_CALL_SECONDS` (the server's bound is 60 s).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            wait = max(0.0, min(left, WAIT_CALL_SECONDS))
            request = operations_pb2.WaitOperationRequest(name=name)
            # Zero would mean the server's default: ask for the least it takes instead.
            request.timeout.FromTimedelta(timedelta(seconds=max(wait, 0.001)))
            try:
                # The call outlives the wait by a margin, for the answer to come back.
                operation = self._operations.WaitOperation(
                    request, timeout=wait + self._timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from error
            if operation.state in OPERATION_FINAL or time.monotonic() >= deadline:
                return operation

    def _pages(self, method: Any, request: Any, items: str) -> Iterator[Any]:
        """Every item of a List call, page by page: ``request`` with each page's token."""
        while True:
            page = self._call(method, request)
            yield from getattr(page, items)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
