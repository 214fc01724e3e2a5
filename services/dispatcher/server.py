"""The dispatcher's gRPC server."""

from __future__ import annotations

from weir.internal.dispatcher.v1 import dispatcher_pb2_grpc

from libs import tls
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.dispatcher.engine import ExecutorDirectory
from services.dispatcher.handler import DispatcherHandler

# Only executor-managers report load: a report decides where tenants' tasks are sent.
CALLERS = {"weir.internal.dispatcher.v1.DispatcherService": {"executor-manager"}}


def create_server(config: WeirConfig, *, directory: ExecutorDirectory) -> GrpcServer:
    """Serves DispatcherService (executor load reports feed the directory), over mutual TLS."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.dispatcher_port, workers=config.grpc_workers,
        credentials=tls.Credentials.of(config, "dispatcher"), callers=CALLERS,
        servicers=[servicer(dispatcher_pb2_grpc, "DispatcherService",
                            DispatcherHandler(directory))])
