"""The Python client of the public weir.v1 API."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2
from weir.v1 import functions_pb2, functions_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from libs.errors import from_rpc_error

FINAL = {tasks_pb2.TaskState.TASK_STATE_SUCCEEDED, tasks_pb2.TaskState.TASK_STATE_FAILED,
         tasks_pb2.TaskState.TASK_STATE_CANCELLED, tasks_pb2.TaskState.TASK_STATE_EXPIRED}
BATCH_LIMIT = 1000

# Reads are idempotent: gRPC retries them by itself when a server is briefly unavailable.
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "weir.v1.TaskService", "method": m} for m in ("GetTask", "ListTasks")]
    + [{"service": "weir.v1.FunctionService", "method": m}
       for m in ("GetFunction", "ListFunctions")],
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
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)])
        self._tasks = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._functions = functions_pb2_grpc.FunctionServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {api_key}")]
        self._timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def create_task(self, function: str, payload: bytes = b"", *, task_id: str = "",
                    request_id: str = "", **fields: Any) -> tasks_pb2.Task:
        """Submits one task; ``fields`` are further `weir.v1.Task` fields (priority, labels…)."""
        task = tasks_pb2.Task(function=function, payload=payload, task_id=task_id, **fields)
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
        token = ""
        while True:
            page = self._call(self._tasks.ListTasks, tasks_pb2.ListTasksRequest(
                filter=filter, page_size=page_size, page_token=token))
            yield from page.tasks
            token = page.next_page_token
            if not token:
                return

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

    def get_function(self, name: str) -> functions_pb2.Function:
        return self._call(self._functions.GetFunction, functions_pb2.GetFunctionRequest(name=name))

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
