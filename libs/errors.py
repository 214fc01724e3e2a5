"""Typed errors on both sides of the wire.

Core code raises a `WeirError`; the server's error interceptor turns it into its one gRPC
status code with google.rpc details (`BadRequest`, `ErrorInfo`, `RetryInfo`), and clients turn
a received status back into the same class with `from_rpc_error`.
"""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "weir.dev"


class WeirError(Exception):
    """Base of every error that crosses the wire with a chosen status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, reason: str = "", metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[Message]:
        """The google.rpc detail messages that travel with the status."""
        if not self.reason:
            return []
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN,
                                            metadata=self.metadata)]

    def to_status(self) -> grpc.Status:
        packed = []
        for detail in self.details():
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return rpc_status.to_status(status_pb2.Status(
            code=self.code.value[0], message=self.message, details=packed))


class InvalidArgument(WeirError):
    """The request is malformed; `violations` maps each bad field path to what is wrong."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: dict[str, str], message: str = ""):
        fields = ", ".join(violations)
        super().__init__(message or f"invalid argument: {fields}")
        self.violations = dict(violations)

    def details(self) -> list[Message]:
        return [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in self.violations.items()])]


class Unauthenticated(WeirError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(WeirError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(WeirError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(WeirError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(WeirError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(WeirError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(WeirError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(WeirError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(WeirError):
    """Over a limit; `retry_after` tells the caller when trying again makes sense, and
    `subject` (e.g. ``tenant:acme``), when set, names who is over it in a QuotaFailure."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: timedelta, reason: str = "",
                 metadata: dict[str, str] | None = None, subject: str = ""):
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after
        self.subject = subject

    def details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(self.retry_after)
        details = [*super().details(), error_details_pb2.RetryInfo(retry_delay=delay)]
        if self.subject:
            details.append(error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=self.subject,
                                                         description=self.message)]))
        return details


_BY_CODE: dict[grpc.StatusCode, type[WeirError]] = {cls.code: cls for cls in (
    InvalidArgument, Unauthenticated, PermissionDenied, NotFound, AlreadyExists,
    FailedPrecondition, Unimplemented, Unavailable, DeadlineExceeded, ResourceExhausted)}


def from_rpc_error(error: grpc.RpcError) -> WeirError:
    """Rebuilds the typed error a server raised from the status a client received."""
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = status.message if status else (error.details() or "")
    info = error_details_pb2.ErrorInfo()
    violations: dict[str, str] = {}
    retry_after = timedelta(0)
    subject = ""
    detail: any_pb2.Any  # grpc_status's stubs type the status as Any
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            subject = quota.violations[0].subject if quota.violations else ""
    cls = _BY_CODE.get(code)
    if cls is InvalidArgument:
        return InvalidArgument(violations, message)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, retry_after=retry_after, reason=info.reason,
                                 metadata=dict(info.metadata), subject=subject)
    # The rest take WeirError's arguments (the two that do not are built above).
    err = (cls or WeirError)(message, reason=info.reason, metadata=dict(info.metadata))
    if cls is None:
        err.code = code
    return err


def excerpt(value: object, limit: int = 64) -> str:
    """``repr`` of a caller's value for an error message, cut to ``limit`` characters.

    Errors travel in gRPC trailers (8 KiB in all by default): echoing a 12 KB input would
    turn a clear NOT_FOUND into a transport error, and logs need no copies of hostile input.
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(str(value))} characters)"
