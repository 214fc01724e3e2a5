"""Group commit for single creates: concurrent CreateTask calls of one tenant share one
submission, so each pays a share of its fixed writes (marker, listing, produce, confirm)
instead of all of them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from weir.v1 import tasks_pb2

from libs.errors import Unavailable, WeirError
from services.gateway.engine import Created

MAX_BATCH = 1000  # as BatchCreateTasks

# (tenant, requests, each request's trace context) -> each request's outcome
CreateMany = Callable[[str, Sequence[tasks_pb2.CreateTaskRequest],
                       Sequence[otel_context.Context]], list[Created]]


@dataclass
class _Waiting:
    """One caller's request, until its answer (or its turn to submit) comes."""

    request: tasks_pb2.CreateTaskRequest
    # The caller's call: its task joins that trace though another caller submits it.
    trace: otel_context.Context = field(default_factory=otel_context.get_current)
    ready: threading.Event = field(default_factory=threading.Event)
    created: Created | None = None
    error: BaseException | None = None
    lead: bool = False  # this caller submits the next batch
    alone: bool = False  # its batch was refused as a whole: it submits on its own

    def answer(self) -> Created:
        if self.error is not None:
            raise self.error
        assert self.created is not None
        return self.created


class Coalescer:
    """While a tenant's submission is in flight, its tenant's next creates wait and then go
    together (at most `MAX_BATCH`), submitted by the first of them — no timer and no added
    latency when calls do not overlap. A batch refused as a whole for one entry's sake (its
    function unknown, a retry policy without end) is not the others' fault: each of its
    callers then submits alone and gets its own answer. An outage (UNAVAILABLE) is everyone's.
    """

    def __init__(self, create_many: CreateMany) -> None:
        self._create_many = create_many
        self._lock = threading.Lock()
        self._queues: dict[str, list[_Waiting]] = {}
        self._busy: set[str] = set()  # tenants with a submission in flight

    def create(self, tenant_id: str, request: tasks_pb2.CreateTaskRequest) -> Created:
        waiting = _Waiting(request)
        with self._lock:
            self._queues.setdefault(tenant_id, []).append(waiting)
            waiting.lead = tenant_id not in self._busy
            self._busy.add(tenant_id)
        if not waiting.lead:
            waiting.ready.wait()
        if waiting.lead:
            self._submit_next(tenant_id)
        if waiting.alone:
            [created] = self._create_many(tenant_id, [request], [waiting.trace])
            return created
        return waiting.answer()

    def _submit_next(self, tenant_id: str) -> None:
        with self._lock:
            queue = self._queues[tenant_id]
            batch, self._queues[tenant_id] = queue[:MAX_BATCH], queue[MAX_BATCH:]
        try:
            results = self._create_many(tenant_id, [w.request for w in batch],
                                        [w.trace for w in batch])
            for waiting, created in zip(batch, results, strict=True):
                waiting.created = created
        except Unavailable as exc:
            for waiting in batch:
                waiting.error = exc
        except WeirError as exc:
            for waiting in batch:
                if len(batch) == 1:
                    waiting.error = exc
                else:
                    waiting.alone = True
        except BaseException as exc:  # noqa: BLE001 - each caller's call fails with it
            for waiting in batch:
                waiting.error = exc
        with self._lock:
            rest = self._queues[tenant_id]
            if rest:
                rest[0].lead = True  # the next batch is its caller's to submit
                rest[0].ready.set()
            else:
                del self._queues[tenant_id]
                self._busy.discard(tenant_id)
        for waiting in batch:
            waiting.lead = False
            waiting.ready.set()
