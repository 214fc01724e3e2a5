"""ExecutorService: an executor-manager's load, for operators (dispatchers see credits)."""

from __future__ import annotations

import grpc
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc

from services.executor_manager.engine import Executor


class ExecutorHandler(executor_manager_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def GetLoad(self, request: executor_manager_pb2.GetLoadRequest,
                context: grpc.ServicerContext) -> executor_manager_pb2.GetLoadResponse:
        return self._executor.load()
