"""TaskService: the public task API. Proto <-> engine translation and error mapping only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import empty_pb2
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs.cassandra.tasks import FINAL_STATES, StoredTask
from libs.errors import InvalidArgument, NotFound, Unavailable
from libs.lifecycle import Lifecycle
from libs.pagetoken import PageTokens
from services.gateway import validation
from services.gateway.auth import current_tenant
from services.gateway.control import ScanPosition, TaskControl, scan_tasks
from services.gateway.engine import Submitter, raise_for_single
from services.gateway.filters import TaskFilter
from services.gateway.operations import OperationStarter, new_operation
from services.gateway.streams import StreamQuota

View = tasks_pb2.TaskView
Kind = records_pb2.OperationKind
NO_DEADLINE = 1e9  # seconds; grpc reports 'no deadline' as a remaining time beyond this


def shape(task: tasks_pb2.Task, view: int, stages=()) -> tasks_pb2.Task:
    """The task as the requested view shows it."""
    if view == View.TASK_VIEW_FULL:
        task.stages.extend(stages)
        return task
    for field in ("payload", "result", "attempts", "stages"):
        task.ClearField(field)
    return task


class TaskHandler(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, *, submitter: Submitter, lifecycle: Lifecycle, control: TaskControl,
                 operations: OperationStarter, max_payload_bytes: int, batch_rate: float,
                 notifier: Callable[[], notifier_pb2_grpc.NotifierServiceStub],
                 streams: StreamQuota, tokens: PageTokens, allow_private_targets: bool) -> None:
        self._submitter = submitter
        self._lifecycle = lifecycle
        self._tasks = lifecycle.tasks
        self._control = control
        self._operations = operations
        self._batch_rate = batch_rate
        self._max_payload = max_payload_bytes
        self._notifier = notifier  # an asyncio stub, made on the server's loop
        self._streams = streams
        self._tokens = tokens
        self._allow_private = allow_private_targets

    def CreateTask(self, request, context):
        validation.check_create(request, max_payload_bytes=self._max_payload,
                                allow_private_targets=self._allow_private)
        created = self._submitter.create(current_tenant.get(), [request], prefix=lambda i: "")
        return raise_for_single(created[0])

    def BatchCreateTasks(self, request, context):
        validation.check_batch(request, max_payload_bytes=self._max_payload,
                               allow_private_targets=self._allow_private)
        created = self._submitter.create(current_tenant.get(), list(request.requests),
                                         prefix=lambda i: f"requests[{i}].")
        return tasks_pb2.BatchCreateTasksResponse(results=[
            tasks_pb2.BatchCreateTaskResult(task=c.task, status=c.status) for c in created])

    def GetTask(self, request, context):
        validation.check_view(request.view)
        stored = self._get(request.task_id)
        view = request.view or View.TASK_VIEW_FULL
        stages = (self._tasks.stages(current_tenant.get(), request.task_id)
                  if view == View.TASK_VIEW_FULL else ())
        return shape(stored.record.task, view, stages)

    def ListTasks(self, request, context):
        validation.check_page(request.page_size, request.page_token)
        validation.check_view(request.view)
        task_filter = TaskFilter.parse(request.filter)
        tenant = current_tenant.get()
        start = ScanPosition.start()
        if request.page_token:
            start = ScanPosition.from_dict(self._tokens.decode(
                request.page_token, listing="tasks", tenant_id=tenant, filter=request.filter))
        page_size = request.page_size or 100
        view = request.view or View.TASK_VIEW_BASIC
        found: list[tasks_pb2.Task] = []
        # At most this many tasks are read for one page: a filter that matches little
        # returns a shorter page (with a token) rather than reading the whole window.
        budget = max(page_size * 20, 2000)
        for position, item in scan_tasks(self._lifecycle, tenant, task_filter, start,
                                         batch=page_size * 2, budget=budget):
            if item is not None:
                found.append(shape(item.record.task, view))
            if item is None or len(found) == page_size:
                return tasks_pb2.ListTasksResponse(tasks=found, next_page_token=(
                    self._tokens.encode(position.to_dict(), listing="tasks", tenant_id=tenant,
                                        filter=request.filter)))
        return tasks_pb2.ListTasksResponse(tasks=found)

    def CancelTask(self, request, context):
        validation.check_reason(request.reason)
        stored = self._get(request.task_id)
        after, _ = self._control.cancel(stored, reason=request.reason or "cancelled by a caller")
        return shape(after.record.task, View.TASK_VIEW_BASIC)

    def DeleteTask(self, request, context):
        self._control.delete(self._get(request.task_id))
        return empty_pb2.Empty()

    def BatchCancelTasks(self, request, context):
        return self._start_batch(request, Kind.OPERATION_KIND_CANCEL_TASKS, "BatchCancelTasks")

    def BatchDeleteTasks(self, request, context):
        return self._start_batch(request, Kind.OPERATION_KIND_DELETE_TASKS, "BatchDeleteTasks")

    def _start_batch(self, request, kind: int, method: str):
        validation.check_request_id(request.request_id)
        if not request.filter.strip():
            raise InvalidArgument({"filter": "required; e.g. function = \"resize\""})
        TaskFilter.parse(request.filter)  # a bad filter fails the call, not the operation
        return self._operations.start(current_tenant.get(), new_operation(
            current_tenant.get(), kind, f"{method} {request.filter}", filter=request.filter,
            items_per_second=self._batch_rate), request_id=request.request_id)

    def _get(self, task_id: str) -> StoredTask:
        validation.check_id(task_id)
        stored = self._tasks.get(current_tenant.get(), task_id)
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
                timeout=_deadline_of(context))
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
        stage = reply.event.stage
        stored = self._tasks.get(tenant, task_id) if stage.state in FINAL_STATES else None
        task = stored.record.task if stored else tasks_pb2.Task(task_id=task_id,
                                                                state=stage.state)
        result = task.result
        task = shape(task, View.TASK_VIEW_BASIC)
        task.result = result
        return tasks_pb2.WatchTaskResponse(stage=stage, task=task)


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining time, to pass upstream (None when it set no deadline)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < NO_DEADLINE else None
