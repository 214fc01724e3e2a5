"""OperationService's ListOperations and WaitOperation, on the running suite: a tenant sees
its own operations only, newest first, and a waiter gets the operation once it is done."""

from __future__ import annotations

import time

import pytest
from google.protobuf import duration_pb2
from weir.v1 import operations_pb2

from libs import errors

OpState = operations_pb2.OperationState


def wait_request(name: str, seconds: float | None = None) -> operations_pb2.WaitOperationRequest:
    request = operations_pb2.WaitOperationRequest(name=name)
    if seconds is not None:
        request.timeout.CopyFrom(duration_pb2.Duration(seconds=int(seconds)))
    return request


def test_a_batch_cancel_is_listed_newest_first_and_waited_for(suite, tenant_factory):
    _, api_key = tenant_factory()
    _, other_key = tenant_factory()
    with suite.client(api_key) as client, suite.client(other_key) as other:
        first = client.batch_cancel_tasks('function = "echo"')
        second = client.batch_cancel_tasks('function = "sleep"')
        other_op = other.batch_cancel_tasks('function = "echo"')

        done = client._call(client._operations.WaitOperation, wait_request(second.name, 30))
        assert done.state == OpState.OPERATION_STATE_SUCCEEDED and done.end_time.seconds > 0
        assert client.wait_operation(first.name, timeout=30).state \
            == OpState.OPERATION_STATE_SUCCEEDED

        # Newest first, across pages of one.
        listed = [op.name for op in client.list_operations(page_size=1)]
        assert listed == [second.name, first.name]
        assert other_op.name not in listed
        assert [op.name for op in other.list_operations()] == [other_op.name]
        with pytest.raises(errors.NotFound):
            other._call(other._operations.WaitOperation, wait_request(first.name, 1))


def test_wait_operation_returns_an_unfinished_operation_at_its_timeout(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        # A re-drive paced at one item a second sleeps ~8 s after its first 8 items.
        operation = client.redrive_dead_letters([f"missing-{i}" for i in range(16)],
                                                per_second=1)
        started = time.monotonic()
        stands = client._call(client._operations.WaitOperation,
                              wait_request(operation.name, 1))
        waited = time.monotonic() - started
        client.cancel_operation(operation.name)
    assert stands.state not in (OpState.OPERATION_STATE_SUCCEEDED,
                                OpState.OPERATION_STATE_FAILED)
    assert 0.9 <= waited < 10


@pytest.mark.parametrize("request_, field", [
    (operations_pb2.ListOperationsRequest(page_token="forged"), "page_token"),
    (operations_pb2.ListOperationsRequest(page_size=5000), "page_size"),
    (wait_request("op-" + "0" * 32, 61), "timeout"),
    (operations_pb2.WaitOperationRequest(name="op-" + "0" * 32,
                                         timeout=duration_pb2.Duration(seconds=-1)), "timeout"),
    (wait_request("not-an-operation", 1), "name"),
])
def test_bad_list_and_wait_requests_name_the_field(suite, tenant, request_, field):
    _, api_key = tenant
    with suite.client(api_key) as client, pytest.raises(errors.InvalidArgument) as raised:
        method = (client._operations.ListOperations
                  if isinstance(request_, operations_pb2.ListOperationsRequest)
                  else client._operations.WaitOperation)
        client._call(method, request_)
    assert field in raised.value.violations


def test_another_tenants_page_token_is_refused(suite, tenant_factory):
    _, api_key = tenant_factory()
    _, other_key = tenant_factory()
    with suite.client(api_key) as client, suite.client(other_key) as other:
        for _ in range(2):
            client.batch_cancel_tasks('function = "echo"')
        page = client._call(client._operations.ListOperations,
                            operations_pb2.ListOperationsRequest(page_size=1))
        assert page.next_page_token
        with pytest.raises(errors.InvalidArgument) as raised:
            other._call(other._operations.ListOperations, operations_pb2.ListOperationsRequest(
                page_token=page.next_page_token))
    assert "page_token" in raised.value.violations
