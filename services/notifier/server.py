"""The notifier's gRPC server."""

from __future__ import annotations

from weir.internal.notifier.v1 import notifier_pb2_grpc

from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer


def create_server(config: WeirConfig) -> GrpcServer:
    """Serves NotifierService; it answers UNIMPLEMENTED until the pipeline issue builds it."""
    return create_grpc_server(
        host=config.bind_host, port=config.notifier_port, workers=config.grpc_workers,
        servicers=[servicer(notifier_pb2_grpc, "NotifierService")])
