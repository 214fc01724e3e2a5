"""FunctionService: registering the handlers tasks target, per tenant."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from google.protobuf import field_mask_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, functions_pb2_grpc, operations_pb2

from libs.cassandra.functions import FunctionStore
from libs.cassandra.taskstate import FINAL_STATES, now_utc, timestamp_of
from libs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, excerpt
from libs.function_defaults import effective
from libs.pagetoken import PageTokens
from services.gateway import validation
from services.gateway.auth import current_tenant
from services.gateway.control import ScanPosition, TaskControl, scan_tasks
from services.gateway.filters import TaskFilter
from services.gateway.operations import OperationStarter, new_operation

OUTPUT_ONLY = ("state", "create_time", "update_time", "adaptive_rate_state")
IMMUTABLE = {"name", *OUTPUT_ONLY}
# The adaptive rate now, from the router (None when it holds none or cannot say).
AdaptiveRateOf = Callable[[str, str], common_pb2.AdaptiveRateState | None]
MAX_MASK_PATHS = 32

State = functions_pb2.FunctionState
OpState = operations_pb2.OperationState
Context = grpc.ServicerContext


class FunctionHandler(functions_pb2_grpc.FunctionServiceServicer):
    def __init__(self, *, functions: FunctionStore, control: TaskControl,
                 operations: OperationStarter, tokens: PageTokens,
                 handler_packages: Sequence[str], allow_private_targets: bool,
                 batch_rate: float, function_changed: Callable[[str, str], None],
                 adaptive_rate: AdaptiveRateOf = lambda tenant_id, name: None) -> None:
        self._functions = functions
        self._adaptive_rate = adaptive_rate
        self._changed = function_changed
        self._control = control
        self._operations = operations
        self._tokens = tokens
        self._packages = tuple(handler_packages)
        self._allow_private = allow_private_targets
        self._batch_rate = batch_rate

    def CreateFunction(self, request: functions_pb2.CreateFunctionRequest, context: Context
                       ) -> functions_pb2.Function:
        self._check(request.function)
        function = functions_pb2.Function()
        function.CopyFrom(request.function)
        for output_only in OUTPUT_ONLY:
            function.ClearField(output_only)
        if not self._functions.create(current_tenant.get(), function):
            raise AlreadyExists(f"function {function.name!r} already exists",
                                reason="FUNCTION_ALREADY_EXISTS")
        self._changed(current_tenant.get(), function.name)  # a cached "not found" is stale
        return effective(function)

    def GetFunction(self, request: functions_pb2.GetFunctionRequest, context: Context
                    ) -> functions_pb2.Function:
        function = effective(self._get(request.name))
        if function.rate_limits.adaptive.enabled:
            state = self._adaptive_rate(current_tenant.get(), function.name)
            if state is not None:
                function.adaptive_rate_state.CopyFrom(state)
        return function

    def ListFunctions(self, request: functions_pb2.ListFunctionsRequest, context: Context
                      ) -> functions_pb2.ListFunctionsResponse:
        validation.check_page(request.page_size, request.page_token)
        tenant = current_tenant.get()
        after = ""
        if request.page_token:
            after = self._tokens.decode(request.page_token, listing="functions",
                                        tenant_id=tenant)
        size = request.page_size or 100
        found = self._functions.list(tenant, after=after, limit=size)
        token = (self._tokens.encode(found[-1].name, listing="functions", tenant_id=tenant)
                 if len(found) == size else "")
        return functions_pb2.ListFunctionsResponse(functions=[effective(f) for f in found],
                                                   next_page_token=token)

    def UpdateFunction(self, request: functions_pb2.UpdateFunctionRequest, context: Context
                       ) -> functions_pb2.Function:
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument({"update_mask": "name at least one field to change"})
        if len(paths) > MAX_MASK_PATHS:
            raise InvalidArgument({"update_mask": f"at most {MAX_MASK_PATHS} paths"})
        mask = field_mask_pb2.FieldMask(paths=paths)
        bad = [p for p in paths if p.split(".")[0] in IMMUTABLE]
        # types-protobuf: DESCRIPTOR may be the upb Descriptor, which it does not accept here.
        descriptor = functions_pb2.Function.DESCRIPTOR
        if bad or not mask.IsValidForDescriptor(descriptor):  # type: ignore[arg-type]
            shown = ", ".join(excerpt(p, 40) for p in (bad or paths)[:5])
            raise InvalidArgument({"update_mask": f"cannot change {shown}: name fields of "
                                                  "Function other than name, state and times"})
        current = self._get(request.function.name, field="function.name")
        self._refuse_if_deleting(current)
        mask.MergeMessage(request.function, current, replace_message_field=True,
                          replace_repeated_field=True)
        self._check(current)
        if not self._save(current):
            raise NotFound(f"function {current.name!r} not found", reason="FUNCTION_NOT_FOUND")
        return effective(current)

    def DeleteFunction(self, request: functions_pb2.DeleteFunctionRequest, context: Context
                       ) -> operations_pb2.Operation:
        """Deletes at once when nothing of the function is unfinished; with ``force``, turns
        it DELETING and leaves the cancelling and the deletion to an operation."""
        tenant = current_tenant.get()
        function = self._get(request.name)
        if not request.force:
            unfinished = self._first_unfinished(tenant, function.name)
            if unfinished:
                raise FailedPrecondition(
                    f"function {function.name!r} has unfinished tasks (e.g. {unfinished!r}); "
                    "cancel them, wait for them, or delete with force",
                    reason="FUNCTION_HAS_UNFINISHED_TASKS",
                    metadata={"task_id": unfinished})
            self._control.delete_function(tenant, function.name)
            record = new_operation(tenant, records_pb2.OperationKind.OPERATION_KIND_DELETE_FUNCTION,
                                   f"DeleteFunction {function.name}", function=function.name,
                                   items_per_second=self._batch_rate)
            record.operation.state = OpState.OPERATION_STATE_SUCCEEDED
            record.operation.end_time.CopyFrom(timestamp_of(now_utc()))
            return self._operations.start(tenant, record)
        if function.state != State.FUNCTION_STATE_DELETING:
            function.state = State.FUNCTION_STATE_DELETING
            self._save(function)
        return self._operations.start(tenant, new_operation(
            tenant, records_pb2.OperationKind.OPERATION_KIND_DELETE_FUNCTION,
            f"DeleteFunction {function.name} (force)", filter=f'function = "{function.name}"',
            function=function.name, items_per_second=self._batch_rate))

    def PauseFunction(self, request: functions_pb2.PauseFunctionRequest, context: Context
                      ) -> functions_pb2.Function:
        function = self._get(request.name)
        self._refuse_if_deleting(function)
        if function.state != State.FUNCTION_STATE_PAUSED:
            function.state = State.FUNCTION_STATE_PAUSED
            self._save(function)
        return function

    def ResumeFunction(self, request: functions_pb2.ResumeFunctionRequest, context: Context
                       ) -> functions_pb2.Function:
        """Marks the function active, then queues the tasks it held. The order matters (see
        the dispatcher's parking); a retried call releases whatever a failed one left."""
        function = self._get(request.name)
        self._refuse_if_deleting(function)
        if function.state != State.FUNCTION_STATE_ACTIVE:
            function.state = State.FUNCTION_STATE_ACTIVE
            self._save(function)
        self._control.release_parked(current_tenant.get(), function.name)
        return function

    def _save(self, function: functions_pb2.Function) -> bool:
        """Stores a changed function; this gateway's submissions see the change at once
        (others within their function cache time)."""
        try:
            return self._functions.update(current_tenant.get(), function)
        finally:
            self._changed(current_tenant.get(), function.name)

    def _first_unfinished(self, tenant: str, name: str) -> str | None:
        """An unfinished task of the function within the listing window, if any; the scan
        stops when the caller's deadline passes."""
        task_filter = TaskFilter.parse(f'function = "{name}"')
        control = self._control
        for _, stored in scan_tasks(control.tasks, control.listing, tenant, task_filter,
                                    ScanPosition.start()):
            if stored is not None and stored.state not in FINAL_STATES:
                return stored.spec.task.task_id
        return None

    def _check(self, function: functions_pb2.Function) -> None:
        problems = validation.function_violations(
            function, handler_packages=self._packages,
            allow_private_targets=self._allow_private)
        if problems:
            raise InvalidArgument(problems)

    @staticmethod
    def _refuse_if_deleting(function: functions_pb2.Function) -> None:
        if function.state == State.FUNCTION_STATE_DELETING:
            raise FailedPrecondition(f"function {function.name!r} is being deleted",
                                     reason="FUNCTION_DELETING")

    def _get(self, name: str, *, field: str = "name") -> functions_pb2.Function:
        validation.check_name(name, field)
        function = self._functions.get(current_tenant.get(), name)
        if function is None:
            raise NotFound(f"function {name!r} not found", reason="FUNCTION_NOT_FOUND")
        return function
