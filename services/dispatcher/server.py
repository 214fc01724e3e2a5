"""The dispatcher's gRPC server."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf.duration_pb2 import Duration
from weir.internal.dispatcher.v1 import dispatcher_pb2_grpc

from libs import tls
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.owner import Owner

# Only executor-managers take work: an assignment carries a tenant's payload.
CALLERS = {"weir.internal.dispatcher.v1.DispatcherService": {"executor-manager"}}


def create_server(config: WeirConfig, *, owner: Owner) -> GrpcServer:
    """Serves DispatcherService (executors' Work streams), over mutual TLS."""
    lease = Duration()
    lease.FromTimedelta(timedelta(seconds=config.lease_seconds))
    return create_grpc_server(
        host=config.internal_bind_host, port=config.dispatcher_port, workers=config.grpc_workers,
        credentials=tls.Credentials.of(config, "dispatcher"), callers=CALLERS,
        servicers=[servicer(dispatcher_pb2_grpc, "DispatcherService",
                            DispatcherHandler(owner, lease=lease))])
