"""The notifier's gRPC server."""

from __future__ import annotations

from weir.internal.notifier.v1 import notifier_pb2_grpc

from libs import tls
from libs.cassandra.taskstate import TaskStateStore
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.notifier.handler import NotifierHandler
from services.notifier.watch import Watchers

# Gateways relay task events to their WatchTask callers (each checks the tenant first).
CALLERS = {"weir.internal.notifier.v1.NotifierService": {"gateway"}}


def create_server(config: WeirConfig, *, tasks: TaskStateStore,
                  watchers: Watchers) -> GrpcServer:
    """Serves NotifierService (task event streams), over mutual TLS."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.notifier_port, workers=config.grpc_workers,
        credentials=tls.Credentials.of(config, "notifier"), callers=CALLERS,
        servicers=[servicer(notifier_pb2_grpc, "NotifierService",
                            NotifierHandler(tasks=tasks, watchers=watchers))])
