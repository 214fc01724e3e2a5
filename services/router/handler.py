"""RouterService: proto in, route out."""

from __future__ import annotations

from weir.internal.router.v1 import router_pb2, router_pb2_grpc

from libs.errors import InvalidArgument
from services.router.engine import RouteTable


class RouterHandler(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, table: RouteTable) -> None:
        self._table = table

    def GetRoute(self, request, context):
        missing = {f: "required" for f in ("tenant_id", "function") if not getattr(request, f)}
        if missing:
            raise InvalidArgument(missing)
        return self._table.route(request.tenant_id, request.function, request.priority)

    def ListRoutes(self, request, context):
        if not request.tenant_id:
            raise InvalidArgument({"tenant_id": "required"})
        return router_pb2.ListRoutesResponse(routes=self._table.routes(request.tenant_id))
