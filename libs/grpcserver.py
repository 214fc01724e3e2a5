"""The gRPC server every Weir service runs: health, reflection, error mapping, graceful stop.

A service hands `create_server` the servicers it implements; this module adds the standard
`grpc.health.v1.Health` and server reflection (so grpcurl works out of the box), installs the
error interceptor, and `serve_until_signalled` runs it until SIGTERM/SIGINT, then shuts down
in order: health NOT_SERVING, stop taking work, drain, stop with a grace period.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.errors import Unimplemented, WeirError

log = logging.getLogger(__name__)

# Health and reflection answer without credentials: probes and grpcurl must work unauthenticated.
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME,
                 "grpc.reflection.v1.ServerReflection")


@dataclass(frozen=True)
class Servicer:
    """One gRPC service a server exposes: its full name and the generated ``add_…_to_server``."""

    name: str
    add: Callable[[grpc.Server], None]


def service_name_of(handler_call_details: grpc.HandlerCallDetails) -> str:
    """``/weir.v1.TaskService/CreateTask`` -> ``weir.v1.TaskService``."""
    return handler_call_details.method.rsplit("/", 1)[0].lstrip("/")


def wrap_handler(handler: grpc.RpcMethodHandler | None,
                 around: Callable[[Callable[..., Any], bool], Callable[..., Any]]
                 ) -> grpc.RpcMethodHandler | None:
    """Rebuilds a method handler with its behaviour wrapped by ``around(behaviour, streams)``.

    ``streams`` tells the wrapper whether the behaviour returns a response iterator, so it can
    also guard errors raised while the stream is being consumed.
    """
    if handler is None:
        return None
    kinds = (("unary_unary", False, grpc.unary_unary_rpc_method_handler),
             ("unary_stream", True, grpc.unary_stream_rpc_method_handler),
             ("stream_unary", False, grpc.stream_unary_rpc_method_handler),
             ("stream_stream", True, grpc.stream_stream_rpc_method_handler))
    for attr, streams, make in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(around(behaviour, streams),
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps `WeirError` to its status with details; masks anything unexpected as INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method

        def fail(context: grpc.ServicerContext, exc: Exception) -> None:
            if isinstance(exc, NotImplementedError):  # the generated base servicer's answer
                exc = Unimplemented(f"{method.lstrip('/')} is not implemented yet")
            if isinstance(exc, WeirError):
                context.abort_with_status(exc.to_status())
            if _is_abort(context):
                raise exc  # a servicer called context.abort itself: its status stands
            ref = uuid.uuid4().hex[:12]
            log.exception("unhandled error in %s", method, extra={"error_ref": ref})
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")

        def around(behaviour, streams):
            def guard_unary(request, context):
                try:
                    return behaviour(request, context)
                except Exception as exc:
                    fail(context, exc)

            def guard_stream(request, context) -> Iterator[Any]:
                try:
                    yield from behaviour(request, context)
                except Exception as exc:
                    fail(context, exc)

            return guard_stream if streams else guard_unary

        return wrap_handler(continuation(handler_call_details), around)


def _is_abort(context: grpc.ServicerContext) -> bool:
    """True when the exception is grpc's own, raised by ``context.abort`` in a servicer."""
    code = getattr(context, "code", lambda: None)()
    return code is not None and code != grpc.StatusCode.OK


class GrpcServer:
    """A started gRPC server with its health servicer, bound to one port."""

    def __init__(self, *, server: grpc.Server, health_servicer: health.HealthServicer,
                 names: Sequence[str], port: int) -> None:
        self.server = server
        self.health = health_servicer
        self.names = list(names)
        self.port = port

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self.names]:
            self.health.set(name, status)

    def stop(self, grace_seconds: float) -> None:
        self.set_serving(False)
        self.server.stop(grace_seconds).wait()

    def serve_until_signalled(self, *, grace_seconds: float,
                              drain: Callable[[], None] = lambda: None) -> None:
        """Blocks until SIGTERM or SIGINT, then shuts down in order.

        Health turns NOT_SERVING first so load balancers stop sending work, ``drain`` lets the
        service stop its own loops (consumers, sweepers), then in-flight RPCs get
        ``grace_seconds`` to finish.
        """
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        stopping.wait()
        log.info("shutting down", extra={"grace_seconds": grace_seconds})
        self.set_serving(False)
        drain()
        self.server.stop(grace_seconds).wait()
        log.info("stopped")


def create_server(*, host: str, port: int, servicers: Iterable[Servicer], workers: int,
                  interceptors: Sequence[grpc.ServerInterceptor] = ()) -> GrpcServer:
    """Builds, binds and starts a server with health, reflection and error mapping.

    Args:
        host: interface to listen on.
        port: port to bind; 0 picks a free one (read it back from ``GrpcServer.port``).
        servicers: the services this process implements.
        workers: threads serving calls.
        interceptors: extra interceptors, run inside the error interceptor so their
            `WeirError`s are mapped too.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=[ErrorInterceptor(), *interceptors],
        options=[("grpc.so_reuseport", 0)],
    )
    servicers = list(servicers)
    for s in servicers:
        s.add(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in servicers]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    result = GrpcServer(server=server, health_servicer=health_servicer, names=names, port=bound)
    result.set_serving(True)
    return result


def servicer(grpc_module: Any, service: str, implementation: Any = None) -> Servicer:
    """Binds an implementation to a generated service, e.g. ``servicer(tasks_pb2_grpc,
    "TaskService", TaskHandler(...))``.

    Without an implementation the generated base class serves, which answers every RPC with
    UNIMPLEMENTED: the service is reachable (health, reflection) before its issue lands.
    """
    pb2 = importlib.import_module(grpc_module.__name__.removesuffix("_grpc"))
    full_name = pb2.DESCRIPTOR.services_by_name[service].full_name
    implementation = implementation or getattr(grpc_module, f"{service}Servicer")()
    add = getattr(grpc_module, f"add_{service}Servicer_to_server")
    return Servicer(full_name, lambda server: add(implementation, server))
