"""The server layer over real gRPC in-process: what a caller sees for each failure, and how
blocking handlers and waiting streams share the server."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from cassandra.cluster import NoHostAvailable
from grpc_reflection.v1alpha import reflection_pb2
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs import errors
from libs.grpcserver import HARD_CAP_FACTOR, create_server, current_call, largest_field, servicer
from tests.helpers import eventually

WORKERS = 2


class Failing(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self) -> None:
        self.stopped_waiting = threading.Event()
        self.waiting = threading.Event()

    def GetTask(self, request, context):
        if request.task_id == "bad":
            raise errors.InvalidArgument({"task_id": "must not be 'bad'"})
        if request.task_id == "fine":
            return tasks_pb2.Task(task_id="fine")
        if request.task_id == "engine-down":  # what the Cassandra driver raises then
            raise NoHostAvailable("Unable to complete the operation against any hosts", {})
        if request.task_id == "wait":  # a long scan: steps until its caller is gone
            self.waiting.set()
            while current_call().active():
                threading.Event().wait(0.01)
            self.stopped_waiting.set()
            return tasks_pb2.Task()
        raise RuntimeError("secret database password in this message")

    async def DeleteTask(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such task")

    async def ListTasks(self, request, context):  # waits like a watch on an idle task
        await asyncio.sleep(3600)

    def WatchTask(self, request, context):
        yield tasks_pb2.WatchTaskResponse()
        raise errors.NotFound("task went away", reason="TASK_NOT_FOUND")


@pytest.fixture(scope="module")
def implementation():
    return Failing()


@pytest.fixture(scope="module")
def stub(implementation):
    server = create_server(host="127.0.0.1", port=0, workers=WORKERS, servicers=[
        servicer(tasks_pb2_grpc, "TaskService", implementation)])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield tasks_pb2_grpc.TaskServiceStub(channel)
    channel.close()
    server.stop(0)


def call_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        fn()
    return raised.value


def test_a_weir_error_reaches_the_caller_with_its_code_and_details(stub):
    error = call_error(lambda: stub.GetTask(tasks_pb2.GetTaskRequest(task_id="bad"), timeout=5))
    typed = errors.from_rpc_error(error)
    assert isinstance(typed, errors.InvalidArgument)
    assert typed.violations == {"task_id": "must not be 'bad'"}


def test_an_unexpected_exception_is_internal_and_its_message_is_masked(stub):
    error = call_error(lambda: stub.GetTask(tasks_pb2.GetTaskRequest(task_id="x"), timeout=5))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "internal error (ref " in error.details()
    assert "password" not in error.details()


def test_an_engine_outage_is_unavailable_so_the_caller_retries(stub):
    error = call_error(lambda: stub.GetTask(tasks_pb2.GetTaskRequest(task_id="engine-down"),
                                            timeout=5))
    typed = errors.from_rpc_error(error)
    assert isinstance(typed, errors.Unavailable) and typed.reason == "ENGINE_UNAVAILABLE"
    assert "hosts" not in error.details()


def test_a_servicer_that_aborts_itself_keeps_its_status(stub):
    error = call_error(lambda: stub.DeleteTask(tasks_pb2.DeleteTaskRequest(task_id="t"),
                                               timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such task"


def test_an_error_raised_mid_stream_ends_the_stream_with_its_status(stub):
    replies = stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id="t"), timeout=5)
    assert next(replies) == tasks_pb2.WatchTaskResponse()
    error = call_error(lambda: next(replies))
    typed = errors.from_rpc_error(error)
    assert isinstance(typed, errors.NotFound) and typed.reason == "TASK_NOT_FOUND"


def test_an_rpc_not_built_yet_is_unimplemented_by_name(stub):
    error = call_error(lambda: stub.CancelTask(tasks_pb2.CancelTaskRequest(task_id="t"),
                                               timeout=5))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == "weir.v1.TaskService/CancelTask is not implemented yet"


def test_a_blocking_handler_learns_that_its_caller_left(stub, implementation):
    future = stub.GetTask.future(tasks_pb2.GetTaskRequest(task_id="wait"))
    assert implementation.waiting.wait(5)
    future.cancel()
    assert implementation.stopped_waiting.wait(5)


def test_waiting_streams_hold_no_thread_that_unary_calls_need(stub):
    streams = [stub.ListTasks.future(tasks_pb2.ListTasksRequest(), timeout=30)
               for _ in range(WORKERS * 10)]
    try:
        answers = [stub.GetTask(tasks_pb2.GetTaskRequest(task_id="fine"), timeout=5)
                   for _ in range(WORKERS * 3)]
        assert all(a.task_id == "fine" for a in answers)
        assert eventually(lambda: not any(s.done() for s in streams))
    finally:
        for s in streams:
            s.cancel()


def test_the_field_that_makes_a_request_big_is_named_by_its_path():
    request = tasks_pb2.BatchCreateTasksRequest(requests=[
        tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo", payload=b"x")),
        tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo", payload=b"x" * 99,
                                                        labels={"k": "v"}))])
    assert largest_field(request) == "requests[1].task.payload"
    assert largest_field(tasks_pb2.Task(labels={"k": "v" * 50}, payload=b"x")) == "labels"
    assert largest_field(tasks_pb2.Task()) == ""


def test_a_request_between_the_limit_and_the_hard_cap_is_invalid_argument_naming_the_limit():
    server = create_server(host="127.0.0.1", port=0, workers=WORKERS, max_request_bytes=1000,
                           servicers=[servicer(tasks_pb2_grpc, "TaskService", Failing())])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            assert stub.GetTask(tasks_pb2.GetTaskRequest(task_id="fine"), timeout=5)
            error = errors.from_rpc_error(call_error(lambda: stub.GetTask(
                tasks_pb2.GetTaskRequest(task_id="f" * 2000), timeout=5)))
            assert isinstance(error, errors.InvalidArgument)
            assert "limit is 1000 bytes" in error.violations["task_id"]
            beyond = call_error(lambda: stub.GetTask(  # past the hard cap: grpc's own answer
                tasks_pb2.GetTaskRequest(task_id="f" * (HARD_CAP_FACTOR * 1000 + 1)), timeout=5))
            assert beyond.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(0)


def test_a_raw_reflection_v1_call_lists_the_services(stub, implementation):
    server = create_server(host="127.0.0.1", port=0, workers=WORKERS,
                           servicers=[servicer(tasks_pb2_grpc, "TaskService", implementation)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            # v1 and v1alpha are the same messages on the wire; only the method path differs.
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            [reply] = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                           timeout=5)
            names = {s.name for s in reply.list_services_response.service}
            assert {"weir.v1.TaskService", "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
    finally:
        server.stop(0)
