"""NotifierService: live task events for the gateways' WatchTask streams."""

from __future__ import annotations

from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc

from libs.cassandra.tasks import TaskStore
from libs.errors import InvalidArgument
from services.notifier.engine import Watchers, watch


class NotifierHandler(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(self, *, tasks: TaskStore, watchers: Watchers) -> None:
        self._tasks = tasks
        self._watchers = watchers

    def WatchTask(self, request, context):
        missing = {f: "required" for f in ("tenant_id", "task_id") if not getattr(request, f)}
        if missing:
            raise InvalidArgument(missing)
        for event in watch(self._tasks, self._watchers, request.tenant_id, request.task_id,
                           active=context.is_active):
            yield notifier_pb2.WatchTaskResponse(event=event)
