from datetime import timedelta

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from libs import errors


def test_invalid_argument_carries_a_bad_request_violation_per_field():
    status = errors.InvalidArgument({"task.function": "must not be empty"}).to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich = rpc_status.status_pb2.Status.FromString(dict(status.trailing_metadata)[
        "grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    rich.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("task.function", "must not be empty")]
    assert "task.function" in rich.message


def test_resource_exhausted_tells_when_to_retry():
    status = errors.ResourceExhausted("executor full", retry_after=timedelta(milliseconds=250),
                                      reason="EXECUTOR_FULL").to_status()
    rich = rpc_status.status_pb2.Status.FromString(dict(status.trailing_metadata)[
        "grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in rich.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.ToTimedelta() == timedelta(milliseconds=250)
