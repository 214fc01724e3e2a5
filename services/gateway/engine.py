"""Submission: validate, claim IDs, list the submission, store the tasks, produce, confirm."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cassandra.cluster import ResponseFuture
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from weir.internal.router.v1 import router_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import tracing
from libs.cache import TtlCache
from libs.cassandra.dedup import DedupStore
from libs.cassandra.listing import TaskListing
from libs.cassandra.submissions import Submission, SubmissionStore
from libs.cassandra.taskstate import (
    TaskKey,
    TaskStateStore,
    now_utc,
    timestamp_of,
)
from libs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from libs.function_defaults import DEFAULT_DEDUP_WINDOW, DEFAULT_PRIORITY
from libs.kafka.client import Producer
from libs.taskqueue import message_of, records_by_partition
from services.gateway.metrics import GatewayMetrics
from services.gateway.validation import UNLIMITED_RULE, unlimited_without_end

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
# Enum values read once: each attribute read of a generated enum is a Python call.
QUEUED, SCHEDULED = State.TASK_STATE_QUEUED, State.TASK_STATE_SCHEDULED
ACCEPTED = State.TASK_STATE_ACCEPTED
DELETING = functions_pb2.FunctionState.FUNCTION_STATE_DELETING
# How long a gateway trusts a function it read, at most: a change made through another
# gateway is reported by the function change feed within a second; this bounds how late it
# applies while the feed cannot read the change log.
FUNCTION_CACHE_SECONDS = 5.0
ROUTE_CACHE_SECONDS = 30.0
# A partition with this many tasks waiting is busy: new tasks go to the others of their
# shard while it is (the router lists busy partitions in its backlog).
BUSY_PARTITION = 100
REQUEST_ID_WINDOW = timedelta(hours=24)
SERVICE = "gateway"  # the author of the stages it records


@dataclass
class Created:
    """One entry's outcome: the task, and OK or why it was not created."""

    task: tasks_pb2.Task
    status: status_pb2.Status


@dataclass(frozen=True)
class Shard:
    """A route as the gateway uses it: the topic and the partitions to pick from."""

    topic: str
    partitions: tuple[int, ...]


class Submitter:
    """Turns create requests into durable, queued tasks.

    A create is acknowledged only once its submission is listed, its tasks are stored and
    their records are on Kafka (acks=all). The submission is listed first, so a crash or a
    Kafka failure after the tasks are stored leaves an unconfirmed submission, whose tasks
    the `SubmissionSweeper` produces: a stored task always runs, acknowledged or not.
    """

    def __init__(self, *, tasks: TaskStateStore, listing: TaskListing,
                 submissions: SubmissionStore, functions: TtlCache, dedup: DedupStore,
                 route: Callable[[str, str, common_pb2.Priority], router_pb2.Route],
                 producer: Producer, crash_after_store: bool = False,
                 metrics: GatewayMetrics | None = None) -> None:
        self._tasks = tasks
        self._listing = listing
        self._submissions = submissions
        self._functions = functions  # (tenant, name) -> Function, cached
        self._dedup = dedup
        self._routes = TtlCache(lambda *key: _shard_of(route(*key)), ttl=ROUTE_CACHE_SECONDS)
        self._route_generation: int | None = None
        self._busy: Mapping[tuple[str, int], int] = {}
        self._producer = producer
        self._crash_after_store = crash_after_store
        self._metrics = metrics

    def routing_changed(self, generation: int, busy: Mapping[tuple[str, int], int]) -> None:
        """The router's routes generation (a change drops the cached routes: a tenant moved)
        and its busy partitions, twice a second."""
        if generation != self._route_generation:
            if self._route_generation is not None:
                self._routes.clear()
            self._route_generation = generation
        self._busy = busy

    def create(self, tenant_id: str, requests: Sequence[tasks_pb2.CreateTaskRequest],
               *, prefix: Callable[[int], str], parents: Sequence[Context] | None = None
               ) -> list[Created]:
        """Creates the tasks of validated requests; entries that repeat an ID are reported.

        ``parents``: the trace context each entry's trace hangs from (its own call's, for
        single creates submitted together); None: each gets a trace of its own, linked to
        the current call's (`tracing.task_span`).

        Raises:
            NotFound: an entry names a function the tenant does not have.
            FailedPrecondition: an entry names a function being deleted.
            InvalidArgument: an entry's retry policy, merged with its function's, would retry
                forever (-1 attempts without a max_retry_duration).
            Unavailable: storing or queueing failed (stored tasks are queued by the sweeper).
        """
        functions = self._functions_of(tenant_id, requests, prefix=prefix)
        now = now_utc()
        created = timestamp_of(now)
        results: list[Created | None] = [None] * len(requests)
        specs: list[tuple[int, records_pb2.TaskSpec]] = []
        spans: list[Span] = []
        claims: list[tuple[str, str]] = []
        for i, (request, function) in enumerate(zip(requests, functions, strict=True)):
            task_id = request.task.task_id or uuid.uuid4().hex
            if request.request_id:
                # "/" is in no task ID: request IDs are a namespace of their own.
                claim = self._dedup.claim(tenant_id, "request/" + request.request_id, task_id,
                                          window=REQUEST_ID_WINDOW)
                if not claim.granted:
                    results[i] = self._existing(tenant_id, claim.task_id)
                    continue
            if request.task.task_id:
                window = (function.dedup_window.ToTimedelta()
                          if function.HasField("dedup_window") else DEFAULT_DEDUP_WINDOW)
                claim = self._dedup.claim(tenant_id, task_id, task_id, window=window)
                # Past its window the ID is free again, but not while its task still exists
                # (the one claimant reads, so no other can create it in between).
                if not claim.granted or self._tasks.exists(TaskKey(tenant_id, task_id)):
                    results[i] = Created(tasks_pb2.Task(task_id=task_id), status_pb2.Status(
                        code=code_pb2.ALREADY_EXISTS,
                        message=f"task {task_id!r} already exists"))
                    continue
                claims.append((tenant_id, task_id))
            spec = self._spec(tenant_id, task_id, request, function, now, created)
            spans.append(_traced(spec, parents[i] if parents is not None else None))
            specs.append((i, spec))
        if specs:
            states = self._submit([spec for _, spec in specs], now=now, created=created,
                                  claims=claims, spans=spans)
            ok = status_pb2.Status(code=code_pb2.OK)
            for (i, spec), state in zip(specs, states, strict=True):
                results[i] = Created(_shown(spec, state), ok)
        return results  # type: ignore[return-value]

    def _functions_of(self, tenant_id: str, requests: Sequence[tasks_pb2.CreateTaskRequest],
                      *, prefix: Callable[[int], str]) -> list[functions_pb2.Function]:
        """Each entry's function, checked: it exists, is not being deleted, and the entry's
        retry policy merged with its own ends."""
        functions = []
        seen: dict[str, functions_pb2.Function | None] = {}  # a batch names few functions
        unlimited: dict[str, str] = {}
        for i, request in enumerate(requests):
            name = request.task.function
            if name not in seen:
                seen[name] = self._functions.get(tenant_id, name)
            function = seen[name]
            if function is None:
                raise NotFound(f"{prefix(i)}task.function: function {name!r} not found",
                               reason="FUNCTION_NOT_FOUND", metadata={"function": name})
            if function.state == DELETING:
                raise FailedPrecondition(f"{prefix(i)}task.function: function "
                                         f"{function.name!r} is being deleted",
                                         reason="FUNCTION_DELETING",
                                         metadata={"function": function.name})
            if request.task.HasField("retry_config") and unlimited_without_end(
                    [function.retry_config, request.task.retry_config]):
                unlimited[f"{prefix(i)}task.retry_config.max_retry_duration"] = UNLIMITED_RULE
            functions.append(function)
        if unlimited:
            raise InvalidArgument(unlimited)
        return functions

    def _submit(self, specs: list[records_pb2.TaskSpec], *, now: datetime, created: Timestamp,
                claims: list[tuple[str, str]], spans: list[Span]) -> list[State]:
        """Lists the submission, stores the tasks (created at ``now``), produces them;
        returns their states. Ends each task's span."""
        submission = Submission.new(now)
        states: list[State] = [SCHEDULED if spec.task.HasField("schedule_time") else QUEUED
                               for spec in specs]
        traced = [(spec, span) for spec, span in zip(specs, spans, strict=True)
                  if span.is_recording()]
        stored_ns = time.time_ns()
        try:
            # First, and durable before any task is: a crash after it leaves work to sweep.
            self._submissions.begin(submission, [TaskKey(s.tenant_id, s.task.task_id)
                                                 for s in specs]).result()
            futures = self._listing.add(specs)
            accepted = tasks_pb2.TaskStage(state=ACCEPTED, time=created, service=SERVICE)
            entered = {state: tasks_pb2.TaskStage(state=state, time=created, service=SERVICE)
                       for state in set(states)}
            futures += [self._tasks.create(spec, state=state,
                                           stages=(accepted, entered[state]))
                        for spec, state in zip(specs, states, strict=True)]
            for future in futures:
                future.result()
        except Exception as exc:
            for tenant, key in claims:
                self._dedup.release(tenant, key, key)
            _end_spans(spans, traced, "cassandra.store", stored_ns, error=str(exc))
            raise Unavailable(f"could not store the tasks: {exc}") from exc
        if self._metrics is not None:
            self._metrics.accepted(specs)  # stored: they run, whatever happens next
        if self._crash_after_store:
            os._exit(17)  # fault injection for tests: die between store and produce
        produced_ns = time.time_ns()
        for spec, _ in traced:
            tracing.record(spec.trace_context, "cassandra.store", stored_ns, produced_ns,
                           attributes={"weir.tasks": len(specs)}, kind=SpanKind.CLIENT)
        enqueued = timestamp_of(now_utc())
        try:
            self._producer.send_all(records_by_partition(
                (spec.topic, spec.partition,
                 message_of(spec, attempt_number=1, enqueue_time=enqueued)) for spec in specs))
        except Exception as exc:
            _end_spans(spans, traced, "kafka.produce", produced_ns, error=str(exc))
            raise Unavailable("tasks stored but not yet queued; they will run — retry with "
                              f"the same request_id to get them: {exc}") from exc
        _end_spans(spans, traced, "kafka.produce", produced_ns)
        # Not awaited: should it be lost, the sweeper produces the tasks again, and their
        # owners, asked to check, find them already held.
        _log_failure(self._submissions.produced(submission), submission)
        return states

    def _existing(self, tenant_id: str, task_id: str) -> Created:
        [stored] = self._tasks.get_many([TaskKey(tenant_id, task_id)], history=False)
        task = stored.to_task(full=False) if stored else tasks_pb2.Task(task_id=task_id)
        return Created(task, status_pb2.Status(code=code_pb2.OK))

    def _spec(self, tenant_id: str, task_id: str, request: tasks_pb2.CreateTaskRequest,
              function: functions_pb2.Function, now: datetime, created: Timestamp
              ) -> records_pb2.TaskSpec:
        """The task as accepted: the request's fields, defaults resolved, the time
        ``now`` (also as ``created``), and a partition of its route."""
        given = request.task
        priority = given.priority or function.default_priority or DEFAULT_PRIORITY
        shard = self._routes.get(tenant_id, given.function, priority)
        spec = records_pb2.TaskSpec(
            tenant_id=tenant_id, request_id=request.request_id,
            client_task_id=bool(given.task_id), topic=shard.topic,
            partition=pick_partition(shard, self._busy))
        task = spec.task  # filled in place: building it apart would copy it into the spec
        task.task_id = task_id
        task.function = given.function
        task.payload = given.payload
        task.priority = priority
        if given.labels:
            task.labels.update(given.labels)
        task.result_targets.extend(given.result_targets)
        task.create_time.CopyFrom(created)
        if given.HasField("retry_config"):
            task.retry_config.CopyFrom(given.retry_config)
        if given.HasField("expire_time"):
            task.expire_time.CopyFrom(given.expire_time)
        elif given.HasField("max_age"):
            task.expire_time.FromDatetime(now + given.max_age.ToTimedelta())
        if given.HasField("schedule_time") and given.schedule_time.ToDatetime(tzinfo=UTC) > now:
            task.schedule_time.CopyFrom(given.schedule_time)
        return spec


def _traced(spec: records_pb2.TaskSpec, parent: Context | None) -> Span:
    """Starts the task's span and gives the task its trace context and trace id."""
    task = spec.task
    span = tracing.task_span("weir.task", parent=parent)
    if span.is_recording():
        span.set_attributes({"weir.tenant_id": spec.tenant_id, "weir.task_id": task.task_id,
                             "weir.function": task.function,
                             "messaging.destination.name": spec.topic,
                             "messaging.destination.partition.id": str(spec.partition)})
    spec.trace_context.update(tracing.carrier_of(span))
    task.trace_id = tracing.trace_id_of(spec.trace_context)
    return span


def _end_spans(spans: list[Span], traced: list[tuple[records_pb2.TaskSpec, Span]], step: str,
               start_ns: int, *, error: str | None = None) -> None:
    """Records the submission's last step in each sampled task's trace, then ends every
    task's span."""
    end_ns = time.time_ns()
    for spec, _ in traced:
        tracing.record(spec.trace_context, step, start_ns, end_ns, error=error,
                       kind=SpanKind.PRODUCER if step.startswith("kafka") else SpanKind.CLIENT)
    for span in spans:
        tracing.end_with(span, end_ns, error=error)


def pick_partition(shard: Shard, busy: Mapping[tuple[str, int], int]) -> int:
    """A partition of the shard at random among those not busy; when all are, the one with
    the fewest waiting. So a flood on one partition slows only the tasks already there."""
    calm = [p for p in shard.partitions if (shard.topic, p) not in busy]
    if calm:
        return random.choice(calm)
    return min(shard.partitions, key=lambda p: busy[(shard.topic, p)])


def _shard_of(route: router_pb2.Route) -> Shard:
    return Shard(route.topic, tuple(route.partitions))


def _shown(spec: records_pb2.TaskSpec, state: State) -> tasks_pb2.Task:
    """A created task as the API shows it (no payload)."""
    task = tasks_pb2.Task()
    task.CopyFrom(spec.task)
    task.ClearField("payload")
    task.state = state
    task.update_time.CopyFrom(spec.task.create_time)
    return task


def _log_failure(future: ResponseFuture, submission: Submission) -> None:
    future.add_errback(lambda exc: log.warning(
        "could not confirm a submission; the sweeper will produce it again",
        extra={"submission": str(submission.id), "error": str(exc)}))


def raise_for_single(created: Created) -> tasks_pb2.Task:
    """The task of a single create, or its error (ALREADY_EXISTS with the existing ID)."""
    if created.status.code == code_pb2.ALREADY_EXISTS:
        raise AlreadyExists(created.status.message, reason="TASK_ALREADY_EXISTS",
                            metadata={"task_id": created.task.task_id})
    return created.task
