"""TaskService: the public task API. Proto <-> engine translation and error mapping only."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime, timedelta

import grpc
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs.cassandra.tasks import FINAL_STATES, TaskKey, TaskStore, now_utc
from libs.errors import InvalidArgument, NotFound, Unavailable
from services.gateway import validation
from services.gateway.auth import current_tenant
from services.gateway.engine import Submitter, raise_for_single
from services.gateway.filters import TaskFilter

View = tasks_pb2.TaskView
LIST_DAYS = 31  # how far back ListTasks looks
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
    def __init__(self, *, submitter: Submitter, tasks: TaskStore, max_payload_bytes: int,
                 notifier: notifier_pb2_grpc.NotifierServiceStub) -> None:
        self._submitter = submitter
        self._tasks = tasks
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
        if not request.task_id:
            raise InvalidArgument({"task_id": "required"})
        tenant = current_tenant.get()
        stored = self._tasks.get(tenant, request.task_id)
        if stored is None:
            raise NotFound(f"task {request.task_id!r} not found", reason="TASK_NOT_FOUND")
        view = request.view or View.TASK_VIEW_FULL
        stages = self._tasks.stages(tenant, request.task_id) if view == View.TASK_VIEW_FULL else ()
        return shape(stored.record.task, view, stages)

    def ListTasks(self, request, context):
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidArgument({"page_size": "between 0 and 1,000"})
        task_filter = TaskFilter.parse(request.filter)
        page_size = request.page_size or 100
        day, before = _decode_token(request.page_token)
        tenant = current_tenant.get()
        view = request.view or View.TASK_VIEW_BASIC
        found: list[tasks_pb2.Task] = []
        oldest = now_utc().date() - timedelta(days=LIST_DAYS)
        while len(found) < page_size and day >= oldest:
            rows = self._tasks.list_page(tenant, day=day, before=before, limit=page_size * 2)
            if not rows:
                day, before = day - timedelta(days=1), datetime.max.replace(tzinfo=UTC)
                continue
            stored = self._tasks.get_many(TaskKey(tenant, task_id) for _, task_id in rows)
            for (create_time, _), item in zip(rows, stored, strict=True):
                before = create_time
                if item is not None and task_filter.matches(item.record.task):
                    found.append(shape(item.record.task, view))
                    if len(found) == page_size:
                        break
        more = len(found) == page_size and day >= oldest
        return tasks_pb2.ListTasksResponse(
            tasks=found, next_page_token=_encode_token(day, before) if more else "")

    def WatchTask(self, request, context):
        if not request.task_id:
            raise InvalidArgument({"task_id": "required"})
        tenant = current_tenant.get()
        if self._tasks.get(tenant, request.task_id) is None:
            raise NotFound(f"task {request.task_id!r} not found", reason="TASK_NOT_FOUND")
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


def _encode_token(day: date, before: datetime) -> str:
    raw = json.dumps({"day": day.isoformat(), "before": before.isoformat()})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_token(token: str) -> tuple[date, datetime]:
    if not token:
        return now_utc().date(), datetime.max.replace(tzinfo=UTC)
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        before = datetime.fromisoformat(raw["before"])
        return date.fromisoformat(raw["day"]), before.replace(tzinfo=before.tzinfo or UTC)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument({"page_token": "not a token this API returned"}) from exc


