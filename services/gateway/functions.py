"""FunctionService: registering the handlers tasks target, per tenant."""

from __future__ import annotations

import base64

from google.protobuf import empty_pb2
from weir.v1 import functions_pb2, functions_pb2_grpc

from libs.cassandra.functions import FunctionStore
from libs.errors import AlreadyExists, InvalidArgument, NotFound
from services.gateway.auth import current_tenant
from services.gateway.control import TaskControl
from services.gateway.validation import function_violations

IMMUTABLE = {"name", "state", "create_time", "update_time"}


State = functions_pb2.FunctionState


class FunctionHandler(functions_pb2_grpc.FunctionServiceServicer):
    def __init__(self, functions: FunctionStore, control: TaskControl) -> None:
        self._functions = functions
        self._control = control

    def CreateFunction(self, request, context):
        problems = function_violations(request.function)
        if problems:
            raise InvalidArgument(problems)
        function = functions_pb2.Function()
        function.CopyFrom(request.function)
        if not self._functions.create(current_tenant.get(), function):
            raise AlreadyExists(f"function {function.name!r} already exists",
                                reason="FUNCTION_ALREADY_EXISTS")
        return function

    def GetFunction(self, request, context):
        return self._get(request.name)

    def ListFunctions(self, request, context):
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument({"page_size": "between 0 and 1,000"})
        size = request.page_size or 100
        try:
            after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
        except ValueError as exc:
            raise InvalidArgument({"page_token": "not a token this API returned"}) from exc
        found = self._functions.list(current_tenant.get(), after=after, limit=size)
        token = base64.urlsafe_b64encode(found[-1].name.encode()).decode() \
            if len(found) == size else ""
        return functions_pb2.ListFunctionsResponse(functions=found, next_page_token=token)

    def UpdateFunction(self, request, context):
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument({"update_mask": "name at least one field to change"})
        bad = [p for p in paths if p.split(".")[0] in IMMUTABLE
               or p.split(".")[0] not in functions_pb2.Function.DESCRIPTOR.fields_by_name]
        if bad:
            raise InvalidArgument({"update_mask": f"cannot change {', '.join(bad)}"})
        current = self._get(request.function.name)
        request.update_mask.MergeMessage(request.function, current, replace_message_field=True,
                                         replace_repeated_field=True)
        problems = function_violations(current)
        if problems:
            raise InvalidArgument(problems)
        if not self._functions.update(current_tenant.get(), current):
            raise NotFound(f"function {current.name!r} not found", reason="FUNCTION_NOT_FOUND")
        return current

    def DeleteFunction(self, request, context):
        if not self._functions.delete(current_tenant.get(), request.name):
            raise NotFound(f"function {request.name!r} not found", reason="FUNCTION_NOT_FOUND")
        return empty_pb2.Empty()

    def PauseFunction(self, request, context):
        function = self._get(request.name)
        if function.state != State.FUNCTION_STATE_PAUSED:
            function.state = State.FUNCTION_STATE_PAUSED
            self._functions.update(current_tenant.get(), function)
        return function

    def ResumeFunction(self, request, context):
        """Marks the function active, then queues the tasks it held. The order matters (see
        the dispatcher's parking); a retried call releases whatever a failed one left."""
        function = self._get(request.name)
        if function.state != State.FUNCTION_STATE_ACTIVE:
            function.state = State.FUNCTION_STATE_ACTIVE
            self._functions.update(current_tenant.get(), function)
        self._control.release_parked(current_tenant.get(), function.name)
        return function

    def _get(self, name: str) -> functions_pb2.Function:
        if not name:
            raise InvalidArgument({"name": "required"})
        function = self._functions.get(current_tenant.get(), name)
        if function is None:
            raise NotFound(f"function {name!r} not found", reason="FUNCTION_NOT_FOUND")
        return function
