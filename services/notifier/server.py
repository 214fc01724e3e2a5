"""The notifier's gRPC server."""

from __future__ import annotations

from weir.internal.notifier.v1 import notifier_pb2_grpc

from libs.cassandra.tasks import TaskStore
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.notifier.engine import Watchers
from services.notifier.handler import NotifierHandler


def create_server(config: WeirConfig, *, tasks: TaskStore, watchers: Watchers) -> GrpcServer:
    """Serves NotifierService: task event streams."""
    return create_grpc_server(
        host=config.internal_bind_host, port=config.notifier_port, workers=config.grpc_workers,
        servicers=[servicer(notifier_pb2_grpc, "NotifierService",
                            NotifierHandler(tasks=tasks, watchers=watchers))])
