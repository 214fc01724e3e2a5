"""The executor-manager's gRPC server."""

from __future__ import annotations

from weir.internal.executor_manager.v1 import executor_manager_pb2_grpc

from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer


def create_server(config: WeirConfig) -> GrpcServer:
    """Serves ExecutorService; it answers UNIMPLEMENTED until the pipeline issue builds it."""
    return create_grpc_server(
        host=config.bind_host, port=config.executor_manager_port, workers=config.grpc_workers,
        servicers=[servicer(executor_manager_pb2_grpc, "ExecutorService")])
