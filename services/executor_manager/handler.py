"""ExecutorService: dispatchers push attempts here."""

from __future__ import annotations

import uuid

from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc

from libs.errors import InvalidArgument
from services.executor_manager.engine import Executor

MAX_ID_CHARS = 128


class ExecutorHandler(executor_manager_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def Dispatch(self, request, context):
        # Checked before anything is taken: a bad request must not cost a worker.
        problems = {f"task.{f}": f"required; at most {MAX_ID_CHARS} characters"
                    for f in ("tenant_id", "task_id", "function")
                    if not 0 < len(getattr(request.task, f)) <= MAX_ID_CHARS}
        try:
            uuid.UUID(request.lease_id)
        except ValueError:
            problems["lease_id"] = "required; a UUID"
        if problems:
            raise InvalidArgument(problems)
        self._executor.dispatch(request)
        return executor_manager_pb2.DispatchResponse(executor_id=self._executor.executor_id)

    def CancelAttempt(self, request, context):
        problems = {f: f"required; at most {MAX_ID_CHARS} characters"
                    for f in ("tenant_id", "task_id")
                    if not 0 < len(getattr(request, f)) <= MAX_ID_CHARS}
        if problems:
            raise InvalidArgument(problems)
        return executor_manager_pb2.CancelAttemptResponse(
            cancelled=self._executor.cancel(request.tenant_id, request.task_id))

    def GetLoad(self, request, context):
        return self._executor.load()
