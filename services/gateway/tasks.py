"""TaskService: the public task API. Proto <-> engine translation and error mapping only."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import empty_pb2
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs.cassandra.tasks import FINAL_STATES, StoredTask
from libs.errors import InvalidArgument, NotFound, Unavailable
from libs.lifecycle import Lifecycle
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
                 streams: StreamQuota) -> None:
        self._submitter = submitter
        self._lifecycle = lifecycle
        self._tasks = lifecycle.tasks
        self._control = control
        self._operations = operations
        self._batch_rate = batch_rate
        self._max_payload = max_payload_bytes
        self._notifier = notifier  # an asyncio stub, made on the server's loop
        self._streams = streams

    def CreateTask(self, request, context):
        validation.check_create(request, max_payload_bytes=self._max_payload)
        created = self._submitter.create(current_tenant.get(), [request], prefix=lambda i: "")
        return raise_for_single(created[0])

    def BatchCreateTasks(self, request, context):
        validation.check_batch(request, max_payload_bytes=self._max_payload)
        created = self._submitter.create(current_tenant.get(), list(request.requests),
                                         prefix=lambda i: f"requests[{i}].")
        return tasks_pb2.BatchCreateTasksResponse(results=[
            tasks_pb2.BatchCreateTaskResult(task=c.task, status=c.status) for c in created])

    def GetTask(self, request, context):
        stored = self._get(request.task_id)
        view = request.view or View.TASK_VIEW_FULL
        stages = (self._tasks.stages(current_tenant.get(), request.task_id)
                  if view == View.TASK_VIEW_FULL else ())
        return shape(stored.record.task, view, stages)

    def ListTasks(self, request, context):
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidArgument({"page_size": "between 0 and 1,000"})
        task_filter = TaskFilter.parse(request.filter)
        page_size = request.page_size or 100
        view = request.view or View.TASK_VIEW_BASIC
        found: list[tasks_pb2.Task] = []
        for position, item in scan_tasks(self._lifecycle, current_tenant.get(), task_filter,
                                         _decode_token(request.page_token), batch=page_size * 2):
            found.append(shape(item.record.task, view))
            if len(found) == page_size:
                return tasks_pb2.ListTasksResponse(tasks=found,
                                                   next_page_token=_encode_token(position))
        return tasks_pb2.ListTasksResponse(tasks=found)

    def CancelTask(self, request, context):
        if len(request.reason) > 256:
            raise InvalidArgument({"reason": "at most 256 characters"})
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
        if not request.filter.strip():
            raise InvalidArgument({"filter": "required; e.g. function = \"resize\""})
        TaskFilter.parse(request.filter)  # a bad filter fails the call, not the operation
        return self._operations.start(current_tenant.get(), new_operation(
            current_tenant.get(), kind, f"{method} {request.filter}", filter=request.filter,
            items_per_second=self._batch_rate), request_id=request.request_id)

    def _get(self, task_id: str) -> StoredTask:
        if not task_id:
            raise InvalidArgument({"task_id": "required"})
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


def _encode_token(position: ScanPosition) -> str:
    return base64.urlsafe_b64encode(position.to_json().encode()).decode()


def _decode_token(token: str) -> ScanPosition:
    if not token:
        return ScanPosition.start()
    try:
        return ScanPosition.from_json(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument({"page_token": "not a token this API returned"}) from exc
