"""The error interceptor, over real gRPC in-process: what a caller sees for each failure."""

from __future__ import annotations

import grpc
import pytest
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs import errors
from libs.grpcserver import create_server, servicer


class Failing(tasks_pb2_grpc.TaskServiceServicer):
    def GetTask(self, request, context):
        if request.task_id == "bad":
            raise errors.InvalidArgument({"task_id": "must not be 'bad'"})
        if request.task_id == "abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such task")
        raise RuntimeError("secret database password in this message")

    def WatchTask(self, request, context):
        yield tasks_pb2.WatchTaskResponse()
        raise errors.NotFound("task went away", reason="TASK_NOT_FOUND")


@pytest.fixture(scope="module")
def stub():
    server = create_server(host="127.0.0.1", port=0, workers=4,
                           servicers=[servicer(tasks_pb2_grpc, "TaskService", Failing())])
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


def test_a_servicer_that_aborts_itself_keeps_its_status(stub):
    error = call_error(lambda: stub.GetTask(tasks_pb2.GetTaskRequest(task_id="abort"),
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
