"""DeadLetterService and OperationService: the failed-for-good tasks and the long-running
operations that act on many tasks. Proto <-> engine translation only."""

from __future__ import annotations

import math
import time
from datetime import datetime

import grpc
from weir.storage.v1 import records_pb2
from weir.v1 import dead_letters_pb2, dead_letters_pb2_grpc, operations_pb2, operations_pb2_grpc

from libs.cassandra.dead_letters import DeadLetterStore
from libs.errors import DeadlineExceeded, InvalidArgument, NotFound
from libs.grpcserver import current_call, time_remaining
from libs.pagetoken import PageTokens
from services.gateway import validation
from services.gateway.auth import current_tenant
from services.gateway.filters import DeadLetterFilter
from services.gateway.operations import (
    WAIT_DEFAULT_SECONDS,
    WAIT_MAX_SECONDS,
    OperationStarter,
    new_operation,
)
from services.gateway.streams import StreamQuota

Kind = records_pb2.OperationKind
MAX_REDRIVE_IDS = 1000
Context = grpc.ServicerContext


class DeadLetterHandler(dead_letters_pb2_grpc.DeadLetterServiceServicer):
    def __init__(self, *, dead_letters: DeadLetterStore, operations: OperationStarter,
                 tokens: PageTokens, max_payload_bytes: int) -> None:
        self._dead_letters = dead_letters
        self._operations = operations
        self._tokens = tokens
        self._max_payload = max_payload_bytes

    def ListDeadLetters(self, request: dead_letters_pb2.ListDeadLettersRequest, context: Context
                        ) -> dead_letters_pb2.ListDeadLettersResponse:
        validation.check_page(request.page_size, request.page_token)
        letter_filter = DeadLetterFilter.parse(request.filter)
        size = request.page_size or 100
        tenant = current_tenant.get()
        after = None
        if request.page_token:
            when, task_id = self._tokens.decode(request.page_token, listing="dead_letters",
                                                tenant_id=tenant, filter=request.filter)
            after = (datetime.fromisoformat(when), task_id)
        found: list[dead_letters_pb2.DeadLetter] = []
        budget = max(size * 20, 2000)  # rows read for one page at most, as ListTasks
        call = current_call()
        while len(found) < size and budget > 0:
            if not call.active():
                raise DeadlineExceeded("the caller stopped waiting for this listing")
            rows = self._dead_letters.page(tenant, after=after, limit=size * 2)
            if not rows:
                return dead_letters_pb2.ListDeadLettersResponse(dead_letters=found)
            for row in rows:
                after = (row.dead_letter_time, row.task_id)
                budget -= 1
                letter = self._dead_letters.get(tenant, row.task_id) \
                    if letter_filter.matches(row) else None
                if letter is not None:
                    found.append(letter)
                if len(found) == size or budget <= 0:
                    break
        token = self._tokens.encode([after[0].isoformat(), after[1]], listing="dead_letters",
                                    tenant_id=tenant, filter=request.filter) if after else ""
        return dead_letters_pb2.ListDeadLettersResponse(dead_letters=found,
                                                        next_page_token=token)

    def GetDeadLetter(self, request: dead_letters_pb2.GetDeadLetterRequest, context: Context
                      ) -> dead_letters_pb2.DeadLetter:
        validation.check_id(request.task_id)
        letter = self._dead_letters.get(current_tenant.get(), request.task_id)
        if letter is None:
            raise NotFound(f"task {request.task_id!r} is not in the dead letters",
                           reason="DEAD_LETTER_NOT_FOUND")
        return letter

    def RedriveDeadLetters(self, request: dead_letters_pb2.RedriveDeadLettersRequest,
                           context: Context) -> operations_pb2.Operation:
        if bool(request.task_ids) == bool(request.filter.strip()):
            raise InvalidArgument({"task_ids": "set exactly one of task_ids and filter"})
        if len(request.task_ids) > MAX_REDRIVE_IDS:
            raise InvalidArgument({"task_ids": f"at most {MAX_REDRIVE_IDS}"})
        validation.check_task_ids(request.task_ids)
        validation.check_request_id(request.request_id)
        rate = request.max_redrives_per_second
        if not (math.isfinite(rate) and 0 <= rate <= 10_000):
            raise InvalidArgument({"max_redrives_per_second": "between 0 (100) and 10,000"})
        if len(request.payload_override) > self._max_payload:
            raise InvalidArgument({"payload_override": f"at most {self._max_payload:,} bytes"})
        DeadLetterFilter.parse(request.filter)
        tenant = current_tenant.get()
        what = (f"{len(request.task_ids)} tasks" if request.task_ids else request.filter)
        record = new_operation(
            tenant, Kind.OPERATION_KIND_REDRIVE_DEAD_LETTERS, f"RedriveDeadLetters {what}",
            filter=request.filter, task_ids=request.task_ids,
            payload_override=request.payload_override
            if request.HasField("payload_override") else None,
            items_per_second=request.max_redrives_per_second or 100)
        return self._operations.start(tenant, record, request_id=request.request_id)


class OperationHandler(operations_pb2_grpc.OperationServiceServicer):
    def __init__(self, operations: OperationStarter, tokens: PageTokens,
                 streams: StreamQuota) -> None:
        self._operations = operations
        self._tokens = tokens
        self._streams = streams  # WaitOperation calls count as the tenant's open streams

    def GetOperation(self, request: operations_pb2.GetOperationRequest, context: Context
                     ) -> operations_pb2.Operation:
        return self._operations.get(current_tenant.get(), request.name)

    def CancelOperation(self, request: operations_pb2.CancelOperationRequest, context: Context
                        ) -> operations_pb2.Operation:
        return self._operations.cancel(current_tenant.get(), request.name)

    def ListOperations(self, request: operations_pb2.ListOperationsRequest, context: Context
                       ) -> operations_pb2.ListOperationsResponse:
        validation.check_page(request.page_size, request.page_token)
        tenant = current_tenant.get()
        after = None
        if request.page_token:
            position = self._tokens.decode(request.page_token, listing="operations",
                                           tenant_id=tenant)
            try:
                after = (datetime.fromisoformat(position[0]), str(position[1]))
            except (TypeError, ValueError, IndexError, KeyError):
                raise InvalidArgument({"page_token": "not a token this API returned"}) from None
        found, last = self._operations.list(tenant, after=after,
                                            limit=request.page_size or 100)
        token = self._tokens.encode([last[0].isoformat(), last[1]], listing="operations",
                                    tenant_id=tenant) if last else ""
        return operations_pb2.ListOperationsResponse(operations=found, next_page_token=token)

    async def WaitOperation(self, request: operations_pb2.WaitOperationRequest,
                            context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        """A coroutine holding no thread while it waits; counted with the tenant's streams."""
        timeout = WAIT_DEFAULT_SECONDS
        if request.HasField("timeout"):
            problem = validation.duration_problem(request.timeout)
            seconds = request.timeout.ToTimedelta().total_seconds()
            if problem or not 0 <= seconds <= WAIT_MAX_SECONDS:
                raise InvalidArgument({"timeout": f"between 0 (the default, "
                                                  f"{WAIT_DEFAULT_SECONDS:g} s) and "
                                                  f"{WAIT_MAX_SECONDS:g} seconds"})
            timeout = seconds or WAIT_DEFAULT_SECONDS
        tenant = current_tenant.get()
        remaining = time_remaining(context)
        deadline = time.monotonic() + remaining if remaining is not None else None
        close = self._streams.open(tenant)
        try:
            return await self._operations.wait(tenant, request.name, timeout=timeout,
                                               call_deadline=deadline)
        finally:
            close()
