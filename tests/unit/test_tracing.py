"""Trace contexts as tasks carry them, and the trace and task fields of every log line."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs import config as weir_config, logs, tracing

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def exported(monkeypatch) -> InMemorySpanExporter:
    """This process's tracer records every sampled span in memory."""
    tracing.setup("test", weir_config.load(trace_sample_ratio=1.0))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda service=None: provider.get_tracer("test"))
    return exporter


def test_a_traceparent_tells_its_trace_id_and_whether_it_is_sampled():
    assert tracing.trace_id_of({"traceparent": SAMPLED}) == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.sampled({"traceparent": SAMPLED})
    assert not tracing.sampled({"traceparent": UNSAMPLED})
    assert not tracing.sampled({}) and tracing.trace_id_of({}) == ""
    assert not tracing.sampled({"traceparent": "garbage"})


def test_work_is_recorded_only_in_sampled_traces(exported):
    tracing.record({"traceparent": UNSAMPLED}, "cassandra.store", 1_000, 2_000)
    assert tracing.start({"traceparent": UNSAMPLED}, "weir.attempt") is None
    tracing.record({"traceparent": SAMPLED}, "cassandra.store", 1_000, 2_000, error="down")
    [span] = exported.get_finished_spans()
    assert span.name == "cassandra.store" and (span.start_time, span.end_time) == (1_000, 2_000)
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    assert not span.status.is_ok


def test_a_span_passed_on_becomes_the_next_hops_parent(exported):
    attempt = tracing.start({"traceparent": SAMPLED}, "weir.attempt")
    assert attempt is not None
    carried = tracing.carrier_of(attempt)
    assert tracing.sampled(carried)
    tracing.record(carried, "weir.handler", 5, 6)
    attempt.end()
    handler, outer = exported.get_finished_spans()
    assert handler.parent.span_id == outer.context.span_id


def test_without_an_endpoint_nothing_new_is_sampled_yet_every_task_has_a_trace_id():
    tracing.setup("test", weir_config.load(otlp_endpoint="", trace_sample_ratio=1.0))
    span = tracing.task_span("weir.task", parent=None)
    carried = tracing.carrier_of(span)
    assert len(tracing.trace_id_of(carried)) == 32 and not tracing.sampled(carried)


def test_log_lines_name_the_trace_and_the_bound_fields():
    tracing.setup("test", weir_config.load(otlp_endpoint="", trace_sample_ratio=0.0))
    formatter = logs.JsonFormatter("gateway")

    def line(**extra: str) -> dict:
        record = logging.LogRecord("weir", logging.INFO, __file__, 1, "hello", None, None)
        record.__dict__.update(extra)
        return json.loads(formatter.format(record))

    assert "trace_id" not in line() and "tenant" not in line()
    span = tracing.task_span("weir.task", parent=None)
    with tracing.trace.use_span(span), logs.bound(tenant="acme"):
        entry = line()
    assert entry["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert entry["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert entry["tenant"] == "acme" and entry["service"] == "gateway"
    about = line(**logs.task_fields("acme", "t1", {"traceparent": SAMPLED}))
    assert about["task_id"] == "t1" and about["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
