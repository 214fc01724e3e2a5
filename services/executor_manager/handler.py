"""ExecutorService: dispatchers push attempts here."""

from __future__ import annotations

from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc

from libs.errors import InvalidArgument
from services.executor_manager.engine import Executor


class ExecutorHandler(executor_manager_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def Dispatch(self, request, context):
        missing = {f"task.{f}": "required" for f in ("tenant_id", "task_id", "function")
                   if not getattr(request.task, f)}
        if not request.lease_id:
            missing["lease_id"] = "required"
        if missing:
            raise InvalidArgument(missing)
        self._executor.dispatch(request)
        return executor_manager_pb2.DispatchResponse(executor_id=self._executor.executor_id)

    def CancelAttempt(self, request, context):
        missing = {f: "required" for f in ("tenant_id", "task_id") if not getattr(request, f)}
        if missing:
            raise InvalidArgument(missing)
        return executor_manager_pb2.CancelAttemptResponse(
            cancelled=self._executor.cancel(request.tenant_id, request.task_id))

    def GetLoad(self, request, context):
        return self._executor.load()
