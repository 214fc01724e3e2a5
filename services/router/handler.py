"""RouterService: proto in, route out."""

from __future__ import annotations

from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import common_pb2

from libs.errors import InvalidArgument
from services.router.engine import RouteTable

MAX_NAME_CHARS = 128


class RouterHandler(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, table: RouteTable) -> None:
        self._table = table

    def GetRoute(self, request, context):
        problems = {f: f"required; at most {MAX_NAME_CHARS} characters"
                    for f in ("tenant_id", "function")
                    if not 0 < len(getattr(request, f)) <= MAX_NAME_CHARS}
        if request.priority not in common_pb2.Priority.values():
            problems["priority"] = "unknown priority"
        if problems:
            raise InvalidArgument(problems)
        return self._table.route(request.tenant_id, request.function, request.priority)

    def ListRoutes(self, request, context):
        if not 0 < len(request.tenant_id) <= MAX_NAME_CHARS:
            raise InvalidArgument({"tenant_id": f"required; at most {MAX_NAME_CHARS} characters"})
        return router_pb2.ListRoutesResponse(routes=self._table.routes(request.tenant_id))
