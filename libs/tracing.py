"""Tracing: one OpenTelemetry trace per task, across the services, Kafka and the worker.

Every gRPC server and internal client is instrumented (`server_interceptor`,
`instrument_channel`). A task's own context travels as W3C ``traceparent`` in its records
(``TaskSpec``, ``TaskMessage``, ``Assignment``, ``AttemptAssignment``, ``AttemptOutcome``
``trace_context``): a Kafka record carries many tasks, and each keeps its own. Each hop
makes its spans as children of the context it received and passes its own on.

Cost: spans of a task are made only when its trace is sampled (`sampled`); an unsampled task
costs a string copy per hop. Work done for many tasks at once (one Cassandra batch, one
produce) is timed once and recorded in each sampled task's trace (`record`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from functools import cache

import grpc
from opentelemetry import context as otel_context, trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    client_interceptor,
    filters,
    grpcext,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from libs import config as weir_config

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TraceContext = Mapping[str, str]  # the W3C headers: traceparent (and tracestate)

_propagator = TraceContextTextMapPropagator()
_providers: dict[str, TracerProvider] = {}
_settings: dict[str, object] = {"endpoint": "", "ratio": 0.0}
_own: dict[str, trace.Tracer] = {}  # "tracer": this process's, once `setup` ran

# Calls that say nothing about a task: probes, grpcurl's reflection, and the long-lived
# streams between services (an executor's Work stream lives for hours; its tasks have spans
# of their own).
_UNTRACED = filters.negate(filters.any_of(
    filters.health_check(),
    filters.service_prefix("grpc.reflection."),
    filters.full_method_name("/weir.internal.dispatcher.v1.DispatcherService/Work"),
    filters.full_method_name("/weir.worker.v1.WorkerService/Run"),
    # A watcher that leaves closes the stream in another context, and the instrumentation
    # logs an error for each; the watched task has its own trace.
    filters.full_method_name("/weir.v1.TaskService/WatchTask"),
))


def setup(service: str, config: weir_config.WeirConfig) -> None:
    """Makes this process's tracer provider for ``service`` (``weir-<service>`` in Jaeger).

    With no ``otlp_endpoint`` nothing is exported and no new trace is sampled; trace ids
    are made all the same, so logs and GetTask still name them.
    """
    _settings.update(endpoint=config.otlp_endpoint, ratio=config.trace_sample_ratio)
    _providers.clear()
    _tracer.cache_clear()
    own = provider(service)
    _own["tracer"] = own.get_tracer("weir")
    trace.set_tracer_provider(own)  # for the gRPC instrumentation (the API takes it once)


def provider(service: str) -> TracerProvider:
    """The provider whose spans show as ``weir-<service>``: the process's own, or one for
    spans it records on another's behalf (the executor-manager's for its workers)."""
    if service not in _providers:
        endpoint = str(_settings["endpoint"])
        ratio = float(_settings["ratio"])  # type: ignore[arg-type]
        made = TracerProvider(
            resource=Resource.create({"service.name": f"weir-{service}"}),
            sampler=ParentBased(TraceIdRatioBased(ratio) if endpoint else ALWAYS_OFF))
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            # Exported each second (the SDK's default is 5): a trace is whole in Jaeger soon
            # after its task ends.
            made.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=2),
                schedule_delay_millis=1000))
        _providers[service] = made
    return _providers[service]


def shutdown() -> None:
    """Exports what is still buffered (at most a few seconds); call once, at exit."""
    for made in _providers.values():
        made.shutdown()


@cache
def _tracer(service: str) -> trace.Tracer:
    return provider(service).get_tracer("weir")


def tracer(service: str | None = None) -> trace.Tracer:
    """The tracer of ``service`` (default: this process's own; before `setup`, as in an
    application using the SDK, the global one)."""
    if service:
        return _tracer(service)
    return _own.get("tracer") or trace.get_tracer("weir")


# --- gRPC ----------------------------------------------------------------------------------

def server_interceptor() -> grpc.aio.ServerInterceptor:
    """A span per call (a child of the caller's ``traceparent``), but not for probes,
    reflection and the long-lived internal streams."""
    return aio_server_interceptor(filter_=_UNTRACED)


def instrument_channel(channel: grpc.Channel) -> grpc.Channel:
    """A blocking channel whose calls carry the current trace context."""
    return grpcext.intercept_channel(channel, client_interceptor(filter_=_UNTRACED))


def aio_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    return aio_client_interceptors(filter_=_UNTRACED)


# --- a task's context ----------------------------------------------------------------------

def carrier_of(span: Span) -> dict[str, str]:
    """The W3C headers naming ``span`` as the parent of what comes next (written directly:
    the propagator's inject costs several times more, once per task)."""
    context = span.get_span_context()
    carrier = {TRACEPARENT: f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                            f"{context.trace_flags:02x}"}
    if context.trace_state:
        carrier["tracestate"] = context.trace_state.to_header()
    return carrier


def context_of(carrier: TraceContext) -> otel_context.Context:
    return _propagator.extract(carrier)


def sampled(carrier: TraceContext) -> bool:
    """Whether the task whose context this is is traced (the traceparent's sampled flag)."""
    parent = carrier.get(TRACEPARENT, "")
    return len(parent) == 55 and parent[54] in "13579bdf"


def trace_id_of(carrier: TraceContext) -> str:
    """The trace id (32 hex digits) of a task's context; empty when it has none."""
    parent = carrier.get(TRACEPARENT, "")
    return parent[3:35] if len(parent) == 55 else ""


def start(carrier: TraceContext, name: str, *, start_ns: int | None = None,
          attributes: Mapping[str, str | int] | None = None, kind: SpanKind = SpanKind.INTERNAL,
          service: str | None = None) -> Span | None:
    """A span of a task's trace, child of ``carrier``; None when the task is not sampled
    (callers then skip the work of describing it)."""
    if not sampled(carrier):
        return None
    return tracer(service).start_span(name, context=context_of(carrier), kind=kind,
                                      start_time=start_ns, attributes=attributes)


def record(carrier: TraceContext, name: str, start_ns: int, end_ns: int, *,
           attributes: Mapping[str, str | int] | None = None, error: str | None = None,
           kind: SpanKind = SpanKind.INTERNAL, service: str | None = None) -> None:
    """A finished span of a task's trace, timed by the caller (work done for a batch of
    tasks, or reported by another process); nothing when the task is not sampled."""
    span = start(carrier, name, start_ns=start_ns, attributes=attributes, kind=kind,
                 service=service)
    if span is None:
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


def task_span(name: str, *, parent: otel_context.Context | None) -> Span:
    """The span a task's trace starts from at the gateway: a child of ``parent`` (the
    context of the call that created it, so of the caller's trace when it sent one), or
    with no ``parent`` a trace of its own, linked to the current call's span (the tasks of a
    batch call). Either way each task's trace is sampled on its own.
    """
    if parent is not None:
        return tracer().start_span(name, context=parent, kind=SpanKind.PRODUCER)
    call = trace.get_current_span().get_span_context()
    return tracer().start_span(name, context=otel_context.Context(), kind=SpanKind.PRODUCER,
                               links=[Link(call)] if call.is_valid else None)


def sent_trace(metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's caller sent a trace context of its own."""
    return any(key == TRACEPARENT for key, _ in metadata or ())


def end_with(span: Span, end_ns: int | None = None, *, error: str | None = None) -> None:
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, for log lines; None outside any."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def update(target: MutableMapping[str, str], carrier: TraceContext) -> None:
    """Replaces a record's trace context with ``carrier``."""
    target.clear()
    target.update(carrier)
