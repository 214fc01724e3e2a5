"""Tracing on the real suite and the session's real Jaeger: one trace per task, with spans
from every service and the worker, joined to the caller's trace when it sent one."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request

import grpc
import pytest
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs import sdk
from tests.helpers import eventually
from tests.suite import JAEGER_API

SUCCEEDED = tasks_pb2.TaskState.TASK_STATE_SUCCEEDED
EVERY_HOP = {"weir-gateway", "weir-router", "weir-dispatcher", "weir-executor-manager",
             "weir-worker", "weir-notifier"}
TASK_SPANS = {"weir.task", "cassandra.store", "kafka.produce", "weir.queue_wait", "weir.attempt",
              "weir.executor.attempt", "weir.handler", "cassandra.write", "weir.notify",
              "/weir.v1.TaskService/CreateTask"}


def jaeger_trace(trace_id: str) -> dict | None:
    """The trace as Jaeger's query API shows it; None while it has none of it."""
    try:
        with urllib.request.urlopen(f"{JAEGER_API}/traces/{trace_id}", timeout=5) as answer:
            data = json.load(answer)["data"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return data[0] if data else None


def services_of(trace: dict) -> set[str]:
    return {process["serviceName"] for process in trace["processes"].values()}


def traceparent(*, sampled: bool) -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a caller's own trace."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


@pytest.fixture
def stub(suite) -> tasks_pb2_grpc.TaskServiceStub:
    channel = grpc.insecure_channel(suite.address("gateway"))
    yield tasks_pb2_grpc.TaskServiceStub(channel)
    channel.close()


def test_a_task_is_one_trace_from_the_callers_span_through_every_service(suite, tenant, stub):
    header, trace_id, caller_span = traceparent(sampled=True)
    metadata = [("authorization", f"Bearer {tenant[1]}"), ("traceparent", header)]
    task = stub.CreateTask(tasks_pb2.CreateTaskRequest(
        task=tasks_pb2.Task(function="echo", payload=b"traced")), metadata=metadata)
    assert task.trace_id == trace_id
    client = sdk.Client(suite.address("gateway"), api_key=tenant[1])
    assert client.wait(task.task_id).state == SUCCEEDED
    assert client.get_task(task.task_id).trace_id == trace_id

    def whole() -> dict:
        trace = jaeger_trace(trace_id)
        assert trace is not None, "no spans yet"
        names = {span["operationName"] for span in trace["spans"]}
        assert names >= TASK_SPANS, TASK_SPANS - names
        assert services_of(trace) >= EVERY_HOP, EVERY_HOP - services_of(trace)
        return trace

    trace = eventually(whole, timeout=30, message="the task's whole trace in Jaeger")
    spans = {span["spanID"]: span for span in trace["spans"]}
    for span in spans.values():  # one tree, hanging from the caller's span
        assert span["traceID"] == trace_id
        for reference in span["references"]:
            assert reference["spanID"] in spans or reference["spanID"] == caller_span, span
    by_name = {span["operationName"]: span for span in spans.values()}
    # The handler ran inside its executor's attempt, inside the dispatcher's.
    handler, executor = by_name["weir.handler"], by_name["weir.executor.attempt"]
    assert handler["references"][0]["spanID"] == executor["spanID"]
    assert executor["references"][0]["spanID"] == by_name["weir.attempt"]["spanID"]
    assert trace["processes"][handler["processID"]]["serviceName"] == "weir-worker"


def test_an_unsampled_callers_task_is_traced_by_id_only(suite, tenant, stub):
    key = ("authorization", f"Bearer {tenant[1]}")
    quiet_header, quiet_id, _ = traceparent(sampled=False)
    quiet = stub.CreateTask(tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo")),
                            metadata=[key, ("traceparent", quiet_header)])
    assert quiet.trace_id == quiet_id  # still named, in GetTask and in the logs
    client = sdk.Client(suite.address("gateway"), api_key=tenant[1])
    assert client.wait(quiet.task_id).state == SUCCEEDED
    # A sampled task after it: once its whole trace is in Jaeger, so would be anything the
    # same processes recorded of the first (each exports in order).
    header, trace_id, _ = traceparent(sampled=True)
    loud = stub.CreateTask(tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo")),
                           metadata=[key, ("traceparent", header)])
    assert client.wait(loud.task_id).state == SUCCEEDED
    eventually(lambda: (trace := jaeger_trace(trace_id)) is not None
               and "weir.notify" in {s["operationName"] for s in trace["spans"]},
               message="the sampled task's trace")
    assert jaeger_trace(quiet_id) is None


def test_a_batchs_tasks_get_a_trace_each_unless_the_caller_sent_one(suite, tenant, stub):
    key = ("authorization", f"Bearer {tenant[1]}")
    batch = tasks_pb2.BatchCreateTasksRequest(requests=[
        tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo"))] * 3)
    alone = stub.BatchCreateTasks(batch, metadata=[key])
    ids = {result.task.trace_id for result in alone.results}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    header, trace_id, _ = traceparent(sampled=False)
    joined = stub.BatchCreateTasks(batch, metadata=[key, ("traceparent", header)])
    assert {result.task.trace_id for result in joined.results} == {trace_id}
