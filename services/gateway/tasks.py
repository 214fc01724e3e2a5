"""TaskService: the public task API. Proto <-> engine translation and error mapping only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import empty_pb2
from opentelemetry import context as otel_context
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import operations_pb2, tasks_pb2, tasks_pb2_grpc

from libs import tracing
from libs.cassandra.taskstate import StoredTask, TaskKey
from libs.errors import InvalidArgument, NotFound, Unavailable, Unimplemented
from libs.grpcserver import time_remaining
from libs.pagetoken import PageTokens
from services.gateway import validation
from services.gateway.admission import Admission
from services.gateway.attempt_logs import AttemptLogReader
from services.gateway.auth import current_tenant
from services.gateway.coalesce import Coalescer
from services.gateway.control import ScanPosition, TaskControl, scan_tasks
from services.gateway.engine import Submitter, raise_for_single
from services.gateway.filters import TaskFilter
from services.gateway.operations import OperationStarter, new_operation
from services.gateway.streams import StreamQuota

View = tasks_pb2.TaskView
Kind = records_pb2.OperationKind
Context = grpc.ServicerContext


class TaskHandler(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, *, submitter: Submitter, control: TaskControl,
                 operations: OperationStarter, max_payload_bytes: int, batch_rate: float,
                 notifier: Callable[[], notifier_pb2_grpc.NotifierServiceStub],
                 streams: StreamQuota, tokens: PageTokens, allow_private_targets: bool,
                 admission: Admission) -> None:
        self._submitter = submitter
        self._admission = admission
        self._singles = Coalescer(lambda tenant, requests, parents: submitter.create(
            tenant, requests, prefix=lambda i: "", parents=parents))
        self._control = control
        self._tasks = control.tasks
        self._listing = control.listing
        self._operations = operations
        self._batch_rate = batch_rate
        self._max_payload = max_payload_bytes
        self._notifier = notifier  # an asyncio stub, made on the server's loop
        self._streams = streams
        self._tokens = tokens
        self._allow_private = allow_private_targets
        self._attempt_logs = None if control.attempt_logs is None else AttemptLogReader(
            logs=control.attempt_logs, task_of=self._get, tokens=tokens)

    def CreateTask(self, request: tasks_pb2.CreateTaskRequest, context: Context
                   ) -> tasks_pb2.Task:
        validation.check_create(request, max_payload_bytes=self._max_payload,
                                allow_private_targets=self._allow_private)
        self._admission.admit(current_tenant.get(), 1)
        return raise_for_single(self._singles.create(current_tenant.get(), request))

    def BatchCreateTasks(self, request: tasks_pb2.BatchCreateTasksRequest, context: Context
                         ) -> tasks_pb2.BatchCreateTasksResponse:
        validation.check_batch(request, max_payload_bytes=self._max_payload,
                               allow_private_targets=self._allow_private)
        self._admission.admit(current_tenant.get(), len(request.requests))
        # A caller's trace holds all its tasks; otherwise each task gets a trace of its own.
        parents = [otel_context.get_current()] * len(request.requests) \
            if tracing.sent_trace(context.invocation_metadata()) else None
        created = self._submitter.create(current_tenant.get(), list(request.requests),
                                         prefix=lambda i: f"requests[{i}].", parents=parents)
        return tasks_pb2.BatchCreateTasksResponse(results=[
            tasks_pb2.BatchCreateTaskResult(task=c.task, status=c.status) for c in created])

    def GetTask(self, request: tasks_pb2.GetTaskRequest, context: Context) -> tasks_pb2.Task:
        validation.check_view(request.view)
        full = (request.view or View.TASK_VIEW_FULL) == View.TASK_VIEW_FULL
        return self._get(request.task_id, history=full).to_task(full=full)

    def ListTasks(self, request: tasks_pb2.ListTasksRequest, context: Context
                  ) -> tasks_pb2.ListTasksResponse:
        validation.check_page(request.page_size, request.page_token)
        validation.check_view(request.view)
        task_filter = TaskFilter.parse(request.filter)
        tenant = current_tenant.get()
        start = ScanPosition.start()
        if request.page_token:
            start = ScanPosition.from_dict(self._tokens.decode(
                request.page_token, listing="tasks", tenant_id=tenant, filter=request.filter))
        page_size = request.page_size or 100
        full = (request.view or View.TASK_VIEW_BASIC) == View.TASK_VIEW_FULL
        found: list[tasks_pb2.Task] = []
        # At most this many tasks are read for one page: a filter that matches little
        # returns a shorter page (with a token) rather than reading the whole window.
        budget = max(page_size * 20, 2000)
        for position, item in scan_tasks(self._tasks, self._listing, tenant, task_filter,
                                         start, batch=page_size * 2, budget=budget,
                                         history=full):
            if item is not None:
                found.append(item.to_task(full=full))
            if item is None or len(found) == page_size:
                return tasks_pb2.ListTasksResponse(tasks=found, next_page_token=(
                    self._tokens.encode(position.to_dict(), listing="tasks", tenant_id=tenant,
                                        filter=request.filter)))
        return tasks_pb2.ListTasksResponse(tasks=found)

    def CancelTask(self, request: tasks_pb2.CancelTaskRequest, context: Context
                   ) -> tasks_pb2.Task:
        """Asks the task's owner to cancel it and answers once it did (or after a few
        seconds, with the task as it is then)."""
        validation.check_reason(request.reason)
        stored = self._get(request.task_id)
        after = self._control.cancel(stored, reason=request.reason or "cancelled by a caller")
        return after.to_task(full=False)

    def DeleteTask(self, request: tasks_pb2.DeleteTaskRequest, context: Context
                   ) -> empty_pb2.Empty:
        self._control.delete(self._get(request.task_id))
        return empty_pb2.Empty()

    def BatchCancelTasks(self, request: tasks_pb2.BatchCancelTasksRequest, context: Context
                         ) -> operations_pb2.Operation:
        return self._start_batch(request, Kind.OPERATION_KIND_CANCEL_TASKS, "BatchCancelTasks")

    def BatchDeleteTasks(self, request: tasks_pb2.BatchDeleteTasksRequest, context: Context
                         ) -> operations_pb2.Operation:
        return self._start_batch(request, Kind.OPERATION_KIND_DELETE_TASKS, "BatchDeleteTasks")

    def _start_batch(self, request: tasks_pb2.BatchCancelTasksRequest
                     | tasks_pb2.BatchDeleteTasksRequest, kind: Kind, method: str
                     ) -> operations_pb2.Operation:
        validation.check_request_id(request.request_id)
        if not request.filter.strip():
            raise InvalidArgument({"filter": "required; e.g. function = \"resize\""})
        TaskFilter.parse(request.filter)  # a bad filter fails the call, not the operation
        return self._operations.start(current_tenant.get(), new_operation(
            current_tenant.get(), kind, f"{method} {request.filter}", filter=request.filter,
            items_per_second=self._batch_rate), request_id=request.request_id)

    def GetAttemptLog(self, request: tasks_pb2.GetAttemptLogRequest, context: Context
                      ) -> tasks_pb2.AttemptLog:
        return self._logs().get(current_tenant.get(), request)

    def ListAttemptLogs(self, request: tasks_pb2.ListAttemptLogsRequest, context: Context
                        ) -> tasks_pb2.ListAttemptLogsResponse:
        return self._logs().list(current_tenant.get(), request)

    def _logs(self) -> AttemptLogReader:
        if self._attempt_logs is None:
            raise Unimplemented("this gateway serves no attempt logs")
        return self._attempt_logs

    def _get(self, task_id: str, *, history: bool = False) -> StoredTask:
        """The caller's task; ``history`` reads its timeline and attempts too."""
        validation.check_id(task_id)
        key = TaskKey(current_tenant.get(), task_id)
        stored = (self._tasks.get(key) if history
                  else self._tasks.get_many([key], history=False)[0])
        if stored is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return stored

    async def WatchTask(self, request: tasks_pb2.WatchTaskRequest,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[tasks_pb2.WatchTaskResponse]:
        """Relays the notifier's events; a coroutine, so a waiting stream holds no thread."""
        tenant = current_tenant.get()
        close = self._streams.open(tenant)
        try:
            await asyncio.to_thread(self._get, request.task_id)
            events = self._notifier().WatchTask(
                notifier_pb2.WatchTaskRequest(tenant_id=tenant, task_id=request.task_id),
                timeout=time_remaining(context))
            try:
                async for reply in events:
                    yield await asyncio.to_thread(self._response, reply, tenant,
                                                  request.task_id)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED:
                    return
                raise Unavailable("the watch was interrupted: "
                                  f"{error.details()}") from error
            finally:
                events.cancel()  # the caller left (or the stream ended): stop upstream too
        finally:
            close()

    def _response(self, reply: notifier_pb2.WatchTaskResponse, tenant: str,
                  task_id: str) -> tasks_pb2.WatchTaskResponse:
        """A watch event with the task as it is now (BASIC view, plus its result once
        SUCCEEDED)."""
        stage = reply.event.stage
        [stored] = self._tasks.get_many([TaskKey(tenant, task_id)], history=False)
        if stored is None:  # deleted meanwhile
            return tasks_pb2.WatchTaskResponse(stage=stage, task=tasks_pb2.Task(
                task_id=task_id, state=stage.state))
        task = stored.to_task(full=False)
        if stored.state == tasks_pb2.TaskState.TASK_STATE_SUCCEEDED:
            task.result = stored.result
        return tasks_pb2.WatchTaskResponse(stage=stage, task=task)
