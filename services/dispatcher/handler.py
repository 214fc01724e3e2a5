"""DispatcherService: executor-managers report their load here."""

from __future__ import annotations

from google.protobuf import duration_pb2
from weir.internal.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from libs.errors import InvalidArgument
from services.dispatcher.engine import ExecutorDirectory

REPORT_INTERVAL = duration_pb2.Duration(seconds=1)


class DispatcherHandler(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(self, directory: ExecutorDirectory) -> None:
        self._directory = directory

    def ReportLoad(self, request, context):
        missing = {f: "required" for f in ("executor_id", "address") if not getattr(request, f)}
        if missing:
            raise InvalidArgument(missing)
        self._directory.report(executor_id=request.executor_id, address=request.address,
                               capacity=request.capacity, in_flight=request.in_flight,
                               draining=request.draining)
        return dispatcher_pb2.ReportLoadResponse(report_interval=REPORT_INTERVAL)
