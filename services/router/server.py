"""The router's gRPC server."""

from __future__ import annotations

from weir.internal.router.v1 import router_pb2_grpc

from libs import tls
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.router.backlog import Backlogs
from services.router.engine import RouteTable
from services.router.handler import RouterHandler
from services.router.limits import Allocator

# Gateways route the tasks they accept (and admit them by the backlog); dispatchers share
# the cluster-wide limits and report the backlog.
CALLERS = {"weir.internal.router.v1.RouterService": {"gateway"},
           "/weir.internal.router.v1.RouterService/ShareLimits": {"dispatcher"}}


def create_server(config: WeirConfig, *, routes: RouteTable, allocator: Allocator,
                  backlogs: Backlogs) -> GrpcServer:
    """Serves RouterService from the route table and the limit allocator, over mutual TLS."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.router_port, workers=config.grpc_workers,
        credentials=tls.Credentials.of(config, "router"), callers=CALLERS,
        servicers=[servicer(router_pb2_grpc, "RouterService",
                            RouterHandler(routes, allocator, backlogs))])
