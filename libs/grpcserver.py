"""The gRPC server every Weir service runs: health, reflection, errors, callers, shutdown.

A service hands `create_server` the servicers it implements; this module adds the standard
`grpc.health.v1.Health` and server reflection (so grpcurl works), maps errors, and — for the
internal services — serves mutual TLS and admits each RPC only from the identities allowed
to call it.

The server is grpc.aio on an event-loop thread of its own. Servicer methods may be plain
blocking functions: they run in a bounded thread pool, with `current_call()` telling them
whether their caller still waits. Streams that mostly wait (WatchTask) are written as async
generators, so a waiting stream holds no thread that unary calls and health checks need.
`serve_until_signalled` runs until SIGTERM/SIGINT, then shuts down in order: health
NOT_SERVING, the service's own work stops, in-flight calls drain, stop with a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import logging
import signal
import threading
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cassandra
import grpc
import kafka.errors
from cassandra.cluster import NoHostAvailable
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs lack it
from grpc_reflection.v1alpha import _async as reflection_aio, reflection, reflection_pb2

from libs import tls, tracing
from libs.errors import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    WeirError,
)

# An engine down or overloaded: the caller may retry the same request (UNAVAILABLE).
ENGINE_OUTAGES = (NoHostAvailable, cassandra.OperationTimedOut, cassandra.Unavailable,
                  cassandra.Timeout, kafka.errors.KafkaTimeoutError,
                  kafka.errors.BrokerNotAvailableError)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Health and reflection need no tenant key: probes and grpcurl must work without one (on
# internal ports the TLS handshake has already asked for a deployment certificate).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
MAX_CONCURRENT_CALLS = 10_000  # beyond this a server answers RESOURCE_EXHAUSTED at once
# A server with a request limit of its own takes messages up to this many times the limit
# from the transport, so that it, not grpc, answers the ones in between (see RequestSizeLimit).
HARD_CAP_FACTOR = 4

Behaviour = Callable[..., Any]
Around = Callable[[Behaviour], Behaviour]


@dataclass(frozen=True)
class Servicer:
    """One gRPC service a server exposes: its full name and the generated ``add_…_to_server``."""

    name: str
    add: Callable[[Any], None]


def service_name_of(handler_call_details: grpc.HandlerCallDetails) -> str:
    """``/weir.v1.TaskService/CreateTask`` -> ``weir.v1.TaskService``."""
    return handler_call_details.method.rsplit("/", 1)[0].lstrip("/")


# --- the call a blocking handler serves ----------------------------------------------------

@dataclass
class Call:
    """What blocking handler code knows of its call: whether the caller still waits.

    Long handlers (scans, listings) ask `active` between steps and stop once the caller has
    gone — cancelled, or past its deadline — instead of working on for nobody.
    """

    deadline: float | None = None  # time.monotonic() by which the caller stops waiting
    cancelled: threading.Event = field(default_factory=threading.Event)

    def active(self) -> bool:
        return not self.cancelled.is_set() and (
            self.deadline is None or time.monotonic() < self.deadline)


_current_call: contextvars.ContextVar[Call] = contextvars.ContextVar("weir_call")


def current_call() -> Call:
    """The call being served (outside a call: one that never ends)."""
    return _current_call.get(Call())


NO_DEADLINE = 1e9  # seconds; grpc reports 'no deadline' as a remaining time beyond this


def time_remaining(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining time in seconds; None when it set no deadline."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < NO_DEADLINE else None


class _Bridge:
    """Runs blocking behaviours in the server's thread pool, as async behaviours.

    The pool is bounded: calls beyond it wait for a thread instead of starting one each.
    Cancelling the awaiting task (the client left) marks the `Call`, which the blocking
    code sees through `current_call()`.
    """

    def __init__(self, pool: futures.ThreadPoolExecutor) -> None:
        self._pool = pool

    async def run(self, context: grpc.aio.ServicerContext, fn: Callable[..., T],
                  *args: Any) -> T:
        remaining = time_remaining(context)
        call = Call(time.monotonic() + remaining if remaining is not None else None)
        _current_call.set(call)  # this task's context, copied into the thread below
        run = contextvars.copy_context().run
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, run, fn, *args)
        except asyncio.CancelledError:
            call.cancelled.set()
            raise

    def unary(self, behaviour: Behaviour) -> Behaviour:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self.run(context, behaviour, request, context)
        return unary

    def stream(self, behaviour: Behaviour) -> Behaviour:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            done = object()
            items = await self.run(context, lambda: iter(behaviour(request, context)))
            while (item := await self.run(context, next, items, done)) is not done:
                yield item
        return stream


_KINDS = (("unary_unary", False, grpc.unary_unary_rpc_method_handler),
          ("unary_stream", True, grpc.unary_stream_rpc_method_handler),
          ("stream_unary", False, grpc.stream_unary_rpc_method_handler),
          ("stream_stream", True, grpc.stream_stream_rpc_method_handler))



def wrap_handler(handler: grpc.RpcMethodHandler | None,
                 around: Callable[[Behaviour, bool], Behaviour]
                 ) -> grpc.RpcMethodHandler | None:
    """Rebuilds a method handler with its behaviour wrapped by ``around(behaviour, streams)``.

    Inside the interceptors every behaviour is async: a coroutine function, or an async
    generator function when ``streams`` (the bridge, innermost, made blocking ones so).
    """
    if handler is None:
        return None
    for attr, streams, make in _KINDS:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(around(behaviour, streams),
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


Admit = Callable[[grpc.aio.ServicerContext], Awaitable[Callable[[], None]]]


def admitting(admit: Admit) -> Callable[[Behaviour, bool], Behaviour]:
    """An ``around`` that awaits ``admit(context)`` before the behaviour — it raises to refuse
    the call — and calls the undo it returns once the behaviour is over. ``admit`` runs on
    the event loop: anything blocking belongs in a thread (``asyncio.to_thread``)."""

    def around(behaviour: Behaviour, streams: bool) -> Behaviour:
        if streams:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                undo = await admit(context)
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    # A caller that leaves has the stream closed from another task, where the
                    # context variables ``admit`` set cannot be reset (ValueError): they end
                    # with the call's own task anyway.
                    with contextlib.suppress(ValueError):
                        undo()
            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            undo = await admit(context)
            try:
                return await behaviour(request, context)
            finally:
                undo()
        return unary

    return around


def _nothing() -> None:
    return None


class _BridgeInterceptor(grpc.aio.ServerInterceptor):
    """Innermost: turns blocking behaviours into async ones run in the pool."""

    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        def around(behaviour: Behaviour, streams: bool) -> Behaviour:
            if inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour):
                return behaviour
            return self._bridge.stream(behaviour) if streams else self._bridge.unary(behaviour)

        return wrap_handler(await continuation(handler_call_details), around)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps `WeirError` to its status with details; masks anything unexpected as INTERNAL."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method

        async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
            if isinstance(exc, NotImplementedError):  # the generated base servicer's answer
                exc = Unimplemented(f"{method.lstrip('/')} is not implemented yet")
            if isinstance(exc, WeirError):
                status = exc.to_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            if isinstance(exc, grpc.aio.AbortError):
                raise exc  # a servicer called context.abort itself: its status stands
            if isinstance(exc, ENGINE_OUTAGES):
                log.warning("an engine is unreachable in %s: %s", method, exc)
                outage = Unavailable("Kafka or Cassandra is unreachable for now; retry",
                                     reason="ENGINE_UNAVAILABLE").to_status()
                await context.abort(outage.code, outage.details, outage.trailing_metadata)
            ref = uuid.uuid4().hex[:12]
            log.error("unhandled error in %s", method, exc_info=exc, extra={"error_ref": ref})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")

        def around(behaviour: Behaviour, streams: bool) -> Behaviour:
            if streams:
                async def stream(request: Any, context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator:
                    try:
                        async for item in behaviour(request, context):
                            yield item
                    except Exception as exc:
                        await fail(context, exc)
                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(request, context)
                except Exception as exc:
                    await fail(context, exc)
            return unary

        return wrap_handler(await continuation(handler_call_details), around)


class PeerAuthorizer(grpc.aio.ServerInterceptor):
    """Admits a call only from the Weir identities allowed to make it.

    ``callers`` maps a service (``weir.internal.router.v1.RouterService``) or a method
    (``/weir.internal.executor_manager.v1.ExecutorService/GetLoad``) to the identities
    (`libs.tls.IDENTITIES`) that may call it; the operator may call everything, and every
    authenticated peer may use health and reflection. Anything not listed is refused.
    """

    def __init__(self, callers: Mapping[str, Collection[str]]) -> None:
        self._callers = {name: frozenset(who) | {tls.OPERATOR} for name, who in callers.items()}

    def allowed(self, method: str) -> frozenset[str]:
        service = method.rsplit("/", 1)[0].lstrip("/")
        if service in OPEN_SERVICES:
            return frozenset(tls.IDENTITIES)
        return self._callers.get(method) or self._callers.get(service) or frozenset()

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        allowed = self.allowed(method)

        async def admit(context: grpc.aio.ServicerContext) -> Callable[[], None]:
            identity = tls.peer_identity(context)
            if identity is None:
                raise Unauthenticated("a Weir deployment certificate is required",
                                      reason="PEER_UNAUTHENTICATED")
            if identity not in allowed:
                raise PermissionDenied(f"{identity} may not call {method.lstrip('/')}",
                                       reason="PEER_NOT_ALLOWED",
                                       metadata={"identity": identity})
            return _nothing

        return wrap_handler(await continuation(handler_call_details), admitting(admit))


def largest_field(message: Message) -> str:
    """The path of the field that makes ``message`` big, e.g. ``requests[3].task.payload``:
    the largest field, descending into the largest message (or list element) it holds."""
    path = ""
    while True:
        sizes: list[tuple[int, str, Any]] = []
        for descriptor, value in message.ListFields():
            entries = descriptor.message_type and descriptor.message_type.GetOptions().map_entry
            if not descriptor.message_type or entries:
                sizes.append((_size(value), descriptor.name, None))
            elif descriptor.is_repeated:
                sizes += [(item.ByteSize(), f"{descriptor.name}[{i}]", item)
                          for i, item in enumerate(value)]
            elif descriptor.message_type:
                sizes.append((value.ByteSize(), descriptor.name, value))
            else:
                sizes.append((_size(value), descriptor.name, None))
        if not sizes:
            return path
        _, name, inner = max(sizes, key=lambda entry: entry[0])
        path = f"{path}.{name}" if path else name
        if inner is None:
            return path
        message = inner


def _size(value: Any) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, Message):
        return value.ByteSize()
    if hasattr(value, "items"):  # a map
        return sum(_size(k) + _size(v) for k, v in value.items())
    try:
        return sum(_size(item) for item in value)
    except TypeError:  # a number or an enum
        return 8


class RequestSizeLimit(grpc.aio.ServerInterceptor):
    """Answers a request message over ``limit`` bytes with INVALID_ARGUMENT naming the limit
    and the field that makes it big.

    The transport itself refuses larger messages with a bare RESOURCE_EXHAUSTED — the code
    Weir's admission uses for "retry later" — so the server takes up to ``HARD_CAP_FACTOR``
    times the limit from the transport and this check answers the ones in between.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def check(self, request: Message) -> None:
        size = request.ByteSize()
        if size > self._limit:
            raise InvalidArgument(
                {largest_field(request): f"the request is {size} bytes; the limit is "
                                         f"{self._limit} bytes per request message"},
                f"request too large: {size} bytes; the limit is {self._limit} bytes")

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # no public RPC streams requests; each message would need a check

        def around(behaviour: Behaviour, streams: bool) -> Behaviour:
            if streams:
                async def stream(request: Any, context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator:
                    self.check(request)
                    async for item in behaviour(request, context):
                        yield item
                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self.check(request)
                return await behaviour(request, context)
            return unary

        return wrap_handler(handler, around)


def _add_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    """Serves reflection as ``grpc.reflection.v1`` (what grpcurl and current clients ask for
    first) and ``v1alpha`` (older clients).

    grpcio-reflection (1.85) ships only v1alpha. v1 is the same protocol under another
    package — the same messages, field for field — so one servicer answers both names, and
    v1's descriptor (v1alpha's file renamed) joins the pool so reflection describes it too.
    """
    _register_reflection_v1_file()
    reflector = reflection_aio.ReflectionServicer([*names, REFLECTION_V1], pool=None)
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        reflector.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, handlers),))


def _register_reflection_v1_file() -> None:
    pool = descriptor_pool.Default()
    v1_file = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(v1_file)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = v1_file, "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:  # message fields only: setting it on a scalar is an error
                f.type_name = f.type_name.replace(old, new, 1)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new, 1)
        method.output_type = method.output_type.replace(old, new, 1)
    pool.AddSerializedFile(proto.SerializeToString())


# --- the server ----------------------------------------------------------------------------

class GrpcServer:
    """A started server on its own event-loop thread, with its health servicer."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 server: grpc.aio.Server, health_servicer: health_aio.HealthServicer,
                 pool: futures.ThreadPoolExecutor, names: Sequence[str], port: int) -> None:
        self.loop = loop
        self._thread = thread
        self.server = server
        self.health = health_servicer
        self._pool = pool
        self.names = list(names)
        self.port = port

    def call_soon(self, coroutine: Awaitable[T]) -> T:
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()  # type: ignore

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)

        async def set_all() -> None:
            for name in ["", *self.names]:
                await self.health.set(name, status)

        self.call_soon(set_all())

    def stop(self, grace_seconds: float) -> None:
        self.set_serving(False)
        self.call_soon(self.server.stop(grace_seconds))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        self.stop(grace_seconds)
        log.info("stopped")


def create_server(*, host: str, port: int, servicers: Iterable[Servicer], workers: int,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                  credentials: tls.Credentials | None = None,
                  callers: Mapping[str, Collection[str]] | None = None,
                  max_request_bytes: int | None = None) -> GrpcServer:
    """Builds, binds and starts a server with health, reflection and error mapping.

    Args:
        host: interface to listen on.
        port: port to bind; 0 picks a free one (read it back from ``GrpcServer.port``).
        servicers: the services this process implements.
        workers: threads running blocking handlers.
        interceptors: extra interceptors (e.g. tenant authentication), run inside the error
            interceptor so their `WeirError`s are mapped too.
        credentials: serve mutual TLS with this identity (every internal service); None
            serves plaintext (the public gateway, which authenticates tenants by API key).
        callers: with ``credentials``, who may call what (see `PeerAuthorizer`).
        max_request_bytes: answer larger request messages INVALID_ARGUMENT (up to
            ``HARD_CAP_FACTOR`` times this; beyond, grpc's own RESOURCE_EXHAUSTED). None
            leaves grpc's limits (or, with ``credentials``, the internal ones).
    """
    if (credentials is None) != (callers is None):
        raise ValueError("an internal server needs both credentials and its callers")
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
    # Outermost, the call's span: it sees the status the error mapping sets.
    chain: list[grpc.aio.ServerInterceptor] = [tracing.server_interceptor(), ErrorInterceptor()]
    if callers is not None:
        chain.append(PeerAuthorizer(callers))
    chain += interceptors
    if max_request_bytes is not None:
        chain.append(RequestSizeLimit(max_request_bytes))
    chain.append(_BridgeInterceptor(_Bridge(pool)))
    servicers = list(servicers)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
        options: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]
        if credentials is not None:
            options += tls.MESSAGE_LIMITS
        if max_request_bytes is not None:
            options.append(("grpc.max_receive_message_length",
                            HARD_CAP_FACTOR * max_request_bytes))
        server = grpc.aio.server(interceptors=chain, maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS,
                                 options=options)
        for s in servicers:
            s.add(server)
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = [s.name for s in servicers]
        _add_reflection(server, [*names, health.SERVICE_NAME, reflection.SERVICE_NAME])
        address = f"{host}:{port}"
        bound = (server.add_secure_port(address, credentials.server()) if credentials
                 else server.add_insecure_port(address))
        if bound == 0:
            raise OSError(f"cannot bind {address}")
        await server.start()
        return server, health_servicer, bound

    try:
        server, health_servicer, bound = asyncio.run_coroutine_threadsafe(start(), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        raise
    result = GrpcServer(loop=loop, thread=thread, server=server, health_servicer=health_servicer,
                        pool=pool, names=[s.name for s in servicers], port=bound)
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
