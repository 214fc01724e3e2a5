"""TaskService: the public task API. Proto <-> engine translation and error mapping only."""

from __future__ import annotations

import base64

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
                 notifier: notifier_pb2_grpc.NotifierServiceStub) -> None:
        self._submitter = submitter
        self._lifecycle = lifecycle
        self._tasks = lifecycle.tasks
        self._control = control
        self._operations = operations
        self._batch_rate = batch_rate
        self._max_payload = max_payload_bytes
        self._notifier = notifier

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

    def WatchTask(self, request, context):
        self._get(request.task_id)
        tenant = current_tenant.get()
        remaining = context.time_remaining()  # about 9.2e18 when the caller set no deadline
        events = self._notifier.WatchTask(
            notifier_pb2.WatchTaskRequest(tenant_id=tenant, task_id=request.task_id),
            timeout=remaining if remaining < NO_DEADLINE else None)
        context.add_callback(events.cancel)  # the caller left: stop the upstream stream too
        try:
            yield from self._relay(events, tenant, request.task_id)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return
            raise Unavailable(f"the watch was interrupted: {error.details()}") from error

    def _relay(self, events, tenant: str, task_id: str):
        for reply in events:
            stage = reply.event.stage
            stored = self._tasks.get(tenant, task_id) if stage.state in FINAL_STATES else None
            task = stored.record.task if stored else tasks_pb2.Task(task_id=task_id,
                                                                    state=stage.state)
            result = task.result
            task = shape(task, View.TASK_VIEW_BASIC)
            task.result = result
            yield tasks_pb2.WatchTaskResponse(stage=stage, task=task)


def _encode_token(position: ScanPosition) -> str:
    return base64.urlsafe_b64encode(position.to_json().encode()).decode()


def _decode_token(token: str) -> ScanPosition:
    if not token:
        return ScanPosition.start()
    try:
        return ScanPosition.from_json(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument({"page_token": "not a token this API returned"}) from exc
