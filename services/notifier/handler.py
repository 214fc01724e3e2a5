"""NotifierService: live task events for the gateways' WatchTask streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc

from libs.cassandra.taskstate import TaskStateStore
from libs.errors import InvalidArgument
from services.notifier.watch import Watchers, stages_reader, watch

MAX_ID_CHARS = 128


class NotifierHandler(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(self, *, tasks: TaskStateStore, watchers: Watchers) -> None:
        self._stages = stages_reader(tasks)
        self._watchers = watchers

    async def WatchTask(self, request: notifier_pb2.WatchTaskRequest,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        problems = {f: f"required; at most {MAX_ID_CHARS} characters"
                    for f in ("tenant_id", "task_id")
                    if not 0 < len(getattr(request, f)) <= MAX_ID_CHARS}
        if problems:
            raise InvalidArgument(problems)
        async for event in watch(self._stages, self._watchers, request.tenant_id,
                                 request.task_id):
            yield notifier_pb2.WatchTaskResponse(event=event)
