"""Bad input gets a clear status naming what is wrong, and nothing is half-written."""

from __future__ import annotations

import grpc
import pytest
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs import errors


def assert_nothing_written(client) -> None:
    assert list(client.list_tasks()) == []


@pytest.mark.parametrize("task, field", [
    ({"function": "", "payload": b"x"}, "task.function"),
    ({"function": "Not A Name", "payload": b"x"}, "task.function"),
    ({"function": "echo", "task_id": "has spaces"}, "task.task_id"),
    ({"function": "echo", "priority": 42}, "task.priority"),
])
def test_a_malformed_task_is_invalid_argument_naming_the_field(suite, tenant, task, field):
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_task(**task)
        assert field in raised.value.violations
        assert_nothing_written(client)


def test_an_unknown_function_is_not_found_and_nothing_is_written(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.NotFound) as raised:
            client.create_task("no-such-function", b"x")
        assert raised.value.reason == "FUNCTION_NOT_FOUND"
        with pytest.raises(errors.NotFound):  # one bad entry fails the whole batch
            client.create_tasks([{"function": "echo"}, {"function": "no-such-function"}])
        assert_nothing_written(client)


def test_an_oversized_payload_is_invalid_argument_with_the_limit(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_task("echo", b"x" * (1024 * 1024 + 1))
        assert "limit is 1048576 bytes" in raised.value.violations["task.payload"]
        assert client.wait(client.create_task("echo", b"x" * (1024 * 1024)).task_id,
                           timeout=60).state == tasks_pb2.TaskState.TASK_STATE_SUCCEEDED


def test_a_request_over_the_transport_limit_is_invalid_argument_naming_the_limit(suite, tenant):
    # grpc's own answer would be RESOURCE_EXHAUSTED, which clients retry as admission.
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_task("echo", b"x" * (5 * 1024 * 1024))
        assert "limit is 4194304 bytes" in raised.value.violations["task.payload"]
        assert "4194304" in raised.value.message
        with pytest.raises(errors.InvalidArgument) as raised:  # the path into a batch
            client.create_tasks([{"function": "echo", "payload": b"x" * (1024 * 1024)}] * 5)
        assert "limit is 4194304 bytes" in raised.value.violations["requests[0].task.payload"]
        assert_nothing_written(client)


def test_a_batch_over_the_limit_or_with_one_bad_entry_is_refused_whole(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client._call(client._tasks.BatchCreateTasks, tasks_pb2.BatchCreateTasksRequest(
                requests=[tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo"))]
                * 1001))
        assert "at most 1000" in raised.value.violations["requests"]
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_tasks([{"function": "echo"}, {"function": ""}])
        assert "requests[1].task.function" in raised.value.violations
        assert_nothing_written(client)


@pytest.mark.parametrize("metadata, reason", [
    ([], "API_KEY_MISSING"),
    ([("authorization", "Bearer weir_wrong")], "API_KEY_INVALID"),
    ([("authorization", "Token abc")], "API_KEY_MALFORMED"),
])
def test_a_missing_or_wrong_api_key_is_unauthenticated(suite, metadata, reason):
    with (grpc.insecure_channel(suite.address("gateway")) as channel,
          pytest.raises(grpc.RpcError) as raised):
        tasks_pb2_grpc.TaskServiceStub(channel).CreateTask(
            tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo")),
            metadata=metadata, timeout=10)
    error = errors.from_rpc_error(raised.value)
    assert isinstance(error, errors.Unauthenticated) and error.reason == reason


def test_a_hostile_list_filter_or_page_token_is_invalid_argument(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        for bad in ['function = "x" OR 1=1', "state = NOT_A_STATE", 'create_time >= "soon"']:
            with pytest.raises(errors.InvalidArgument):
                list(client.list_tasks(bad))
        with pytest.raises(errors.InvalidArgument):
            client._call(client._tasks.ListTasks,
                         tasks_pb2.ListTasksRequest(page_token="%%%not-a-token"))


