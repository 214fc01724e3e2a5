"""The executor-manager's gRPC server."""

from __future__ import annotations

from weir.internal.executor_manager.v1 import executor_manager_pb2_grpc

from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.executor_manager.engine import Executor
from services.executor_manager.handler import ExecutorHandler


def create_server(config: WeirConfig, *, executor: Executor) -> GrpcServer:
    """Serves ExecutorService over the executor's worker pool."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.executor_manager_port, workers=config.grpc_workers,
        servicers=[servicer(executor_manager_pb2_grpc, "ExecutorService",
                            ExecutorHandler(executor))])
