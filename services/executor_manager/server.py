"""The executor-manager's gRPC server."""

from __future__ import annotations

from weir.internal.executor_manager.v1 import executor_manager_pb2_grpc

from libs import tls
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.executor_manager.engine import Executor
from services.executor_manager.handler import ExecutorHandler

# The executor takes its work from the dispatchers itself; its load is for them to see.
CALLERS = {"weir.internal.executor_manager.v1.ExecutorService": {"dispatcher"}}


def create_server(config: WeirConfig, *, executor: Executor) -> GrpcServer:
    """Serves ExecutorService over the executor's worker pool, over mutual TLS."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.executor_manager_port,
        workers=config.grpc_workers,
        credentials=tls.Credentials.of(config, "executor-manager"), callers=CALLERS,
        servicers=[servicer(executor_manager_pb2_grpc, "ExecutorService",
                            ExecutorHandler(executor))])
