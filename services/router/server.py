"""The router's gRPC server."""

from __future__ import annotations

from weir.internal.router.v1 import router_pb2_grpc

from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.router.engine import RouteTable
from services.router.handler import RouterHandler


def create_server(config: WeirConfig, *, routes: RouteTable) -> GrpcServer:
    """Serves RouterService from the route table."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.router_port, workers=config.grpc_workers,
        servicers=[servicer(router_pb2_grpc, "RouterService", RouterHandler(routes))])
