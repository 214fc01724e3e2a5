"""The gateway's gRPC server: the public weir.v1 services behind API-key authentication."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from weir.internal.notifier.v1 import notifier_pb2_grpc
from weir.v1 import (
    dead_letters_pb2_grpc,
    functions_pb2_grpc,
    operations_pb2_grpc,
    tasks_pb2_grpc,
    tenants_pb2_grpc,
)

from libs import tls
from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.grpcserver import GrpcServer, create_server as create_grpc_server, servicer
from libs.pagetoken import PageTokens
from libs.sdk.handlers import handler_packages
from services.gateway.admission import Admission
from services.gateway.auth import ApiKeyAuthenticator, AuthInterceptor
from services.gateway.control import TaskControl
from services.gateway.dead_letters import DeadLetterHandler, OperationHandler
from services.gateway.engine import Submitter
from services.gateway.functions import AdaptiveRateOf, FunctionHandler
from services.gateway.operations import OperationStarter
from services.gateway.streams import StreamQuota
from services.gateway.tasks import TaskHandler
from services.gateway.tenants import TenantHandler


def create_server(config: WeirConfig, *, tenants: TenantStore, submitter: Submitter,
                  control: TaskControl, functions: FunctionStore,
                  function_changed: Callable[[str, str], None],
                  dead_letters: DeadLetterStore, operations: OperationStarter,
                  notifier: Callable[[], notifier_pb2_grpc.NotifierServiceStub],
                  admission: Admission,
                  adaptive_rate: AdaptiveRateOf = lambda tenant_id, name: None) -> GrpcServer:
    """Serves the public API on the gateway port; every call must carry a tenant's API key."""
    authenticator = ApiKeyAuthenticator(
        tenant_of=tenants.tenant_of, cache_for=timedelta(seconds=config.api_key_cache_seconds))
    tokens = PageTokens(tls.page_token_key(config))
    # Long-lived calls (WatchTask streams, WaitOperation waits) per tenant and in all.
    streams = StreamQuota(per_tenant=config.max_streams_per_tenant, total=config.max_streams)
    task_handler = TaskHandler(submitter=submitter, control=control,
                               operations=operations, notifier=notifier,
                               max_payload_bytes=config.max_payload_bytes,
                               batch_rate=config.batch_items_per_second,
                               streams=streams,
                               tokens=tokens,
                               allow_private_targets=config.webhook_allow_private,
                               admission=admission)
    return create_grpc_server(
        host=config.gateway_bind_host, port=config.gateway_port, workers=config.grpc_workers,
        interceptors=[AuthInterceptor(authenticator)],
        max_request_bytes=config.max_request_bytes,
        servicers=[
            servicer(tasks_pb2_grpc, "TaskService", task_handler),
            servicer(functions_pb2_grpc, "FunctionService", FunctionHandler(
                functions=functions, control=control, operations=operations, tokens=tokens,
                function_changed=function_changed, adaptive_rate=adaptive_rate,
                handler_packages=handler_packages(config.handler_packages),
                allow_private_targets=config.webhook_allow_private,
                batch_rate=config.batch_items_per_second)),
            servicer(dead_letters_pb2_grpc, "DeadLetterService", DeadLetterHandler(
                dead_letters=dead_letters, operations=operations, tokens=tokens,
                max_payload_bytes=config.max_payload_bytes)),
            servicer(operations_pb2_grpc, "OperationService", OperationHandler(
                operations, tokens, streams)),
            servicer(tenants_pb2_grpc, "TenantService", TenantHandler(tenants)),
        ])
