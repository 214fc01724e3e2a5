"""The gateway's gRPC server: the public weir.v1 services behind API-key authentication."""

from __future__ import annotations

from datetime import timedelta

from weir.v1 import dead_letters_pb2_grpc, functions_pb2_grpc, operations_pb2_grpc, tasks_pb2_grpc

from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from services.gateway.auth import ApiKeyAuthenticator, AuthInterceptor


def create_server(config: WeirConfig, *, tenants: TenantStore) -> GrpcServer:
    """Serves the public API on the gateway port; every call must carry a tenant's API key."""
    authenticator = ApiKeyAuthenticator(
        tenant_of=tenants.tenant_of, cache_for=timedelta(seconds=config.api_key_cache_seconds))
    return create_grpc_server(
        host=config.bind_host, port=config.gateway_port, workers=config.grpc_workers,
        interceptors=[AuthInterceptor(authenticator)],
        servicers=[
            # Each answers UNIMPLEMENTED until the issue that builds it lands.
            servicer(tasks_pb2_grpc, "TaskService"),
            servicer(functions_pb2_grpc, "FunctionService"),
            servicer(dead_letters_pb2_grpc, "DeadLetterService"),
            servicer(operations_pb2_grpc, "OperationService"),
        ])
