"""Submission: validate, claim IDs, store (ACCEPTED), produce, confirm (QUEUED)."""

from __future__ import annotations

import logging
import os
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.rpc import code_pb2, status_pb2
from weir.internal.router.v1 import router_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs.cache import TtlCache
from libs.cassandra.dedup import DedupStore
from libs.cassandra.tasks import BUCKETS, TaskStore, now_utc, timestamp_of
from libs.cassandra.timers import Timer, TimerStore, to_millis
from libs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from libs.kafka.client import Producer
from libs.taskqueue import task_record_to_kafka
from services.gateway.validation import UNLIMITED_RULE, unlimited_without_end

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
Kind = records_pb2.TimerKind

DEFAULT_DEDUP_WINDOW = timedelta(hours=24)
# How long a gateway trusts a function it read: a change made through another gateway (a
# pause, a forced delete) reaches this one's submissions within this time.
FUNCTION_CACHE_SECONDS = 5.0
REQUEST_ID_WINDOW = timedelta(hours=24)


@dataclass
class Created:
    """One entry's outcome: the task, and OK or why it was not created."""

    task: tasks_pb2.Task
    status: status_pb2.Status


class Submitter:
    """Turns create requests into durable, queued tasks.

    A task is acknowledged only once it is stored (ACCEPTED) and produced to Kafka. A crash
    or Kafka failure in between leaves it in the unqueued index, which `sweep_unqueued`
    empties, so an acknowledged — or even an unacknowledged but stored — task always runs.
    """

    def __init__(self, *, tasks: TaskStore, timers: TimerStore, functions: TtlCache,
                 dedup: DedupStore, route: Callable[[str, str, int], router_pb2.Route],
                 producer: Producer, crash_after_store: bool = False) -> None:
        self._tasks = tasks
        self._timers = timers
        self._functions = functions  # (tenant, name) -> Function, cached
        self._dedup = dedup
        self._routes = TtlCache(route, ttl=30.0)
        self._producer = producer
        self._crash_after_store = crash_after_store

    def create(self, tenant_id: str, requests: Sequence[tasks_pb2.CreateTaskRequest],
               *, prefix: Callable[[int], str]) -> list[Created]:
        """Creates the tasks of validated requests; entries that repeat an ID are reported.

        Raises:
            NotFound: an entry names a function the tenant does not have.
            FailedPrecondition: an entry names a function being deleted.
            InvalidArgument: an entry's retry policy, merged with its function's, would retry
                forever (-1 attempts without a max_retry_duration).
            Unavailable: storing or queueing failed (stored tasks are queued by the sweeper).
        """
        functions = []
        unlimited: dict[str, str] = {}
        for i, request in enumerate(requests):
            function = self._functions.get(tenant_id, request.task.function)
            if function is None:
                raise NotFound(f"{prefix(i)}task.function: function "
                               f"{request.task.function!r} not found",
                               reason="FUNCTION_NOT_FOUND",
                               metadata={"function": request.task.function})
            if function.state == functions_pb2.FunctionState.FUNCTION_STATE_DELETING:
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

        now = now_utc()
        results: list[Created | None] = [None] * len(requests)
        records: list[tuple[int, records_pb2.TaskRecord]] = []
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
                if not claim.granted:
                    results[i] = Created(tasks_pb2.Task(task_id=task_id), status_pb2.Status(
                        code=code_pb2.ALREADY_EXISTS,
                        message=f"task {task_id!r} already exists"))
                    continue
                claims.append((tenant_id, task_id))
            records.append((i, self._record(tenant_id, task_id, request, function, now)))

        stored = [r for _, r in records]
        immediate = [r for r in stored if r.task.state == State.TASK_STATE_ACCEPTED]
        try:
            self._timers.add(timers_of(stored))  # before the tasks: none may wait unseen
            self._tasks.create(stored)
        except Exception as exc:
            for tenant, key in claims:
                self._dedup.release(tenant, key, key)
            raise Unavailable(f"could not store the tasks: {exc}") from exc
        if self._crash_after_store:
            os._exit(17)  # fault injection for tests: die between store and produce
        queued_time = now_utc()
        try:
            self._producer.send_all(task_record_to_kafka(r) for r in immediate)
        except Exception as exc:
            raise Unavailable("tasks stored but not yet queued; they will run — retry with "
                              f"the same request_id to get them: {exc}") from exc
        self._tasks.mark_queued(immediate, queued_time=queued_time)
        for i, record in records:
            task = tasks_pb2.Task()
            task.CopyFrom(record.task)
            if task.state == State.TASK_STATE_ACCEPTED:
                task.state = State.TASK_STATE_QUEUED
            task.ClearField("payload")
            results[i] = Created(task, status_pb2.Status(code=code_pb2.OK))
        return results  # type: ignore[return-value]

    def sweep_unqueued(self, *, grace: timedelta) -> int:
        """Queues tasks that were stored but never confirmed on Kafka; returns how many.

        Buckets are swept independently: trouble with one does not hold up the others.
        """
        older_than = now_utc() - grace
        swept = 0
        for bucket in range(BUCKETS):
            try:
                swept += self._sweep_bucket(bucket, older_than=older_than)
            except Exception:
                log.exception("could not sweep an unqueued bucket; trying again next round",
                              extra={"bucket": bucket})
        return swept

    def _sweep_bucket(self, bucket: int, *, older_than: datetime) -> int:
        keys = self._tasks.unqueued(bucket, older_than=older_than)
        found = self._tasks.get_many(keys)
        stored = []
        for key, item in zip(keys, found, strict=True):
            # Only tasks still waiting for the queue. A create that failed half-way left no
            # task (never acknowledged); a task may also have moved on (cancelled).
            waiting = item is not None and item.state in (State.TASK_STATE_ACCEPTED,
                                                          State.TASK_STATE_QUEUED)
            if waiting and not item.record.topic:
                log.error("a stored task has no topic and cannot be queued", extra={
                    "tenant": key.tenant_id, "task_id": key.task_id})
                waiting = False
            if waiting:
                stored.append(item)
            else:
                self._tasks.forget_unqueued(key)
        if not stored:
            return 0
        records = [s.record for s in stored]
        queued_time = now_utc()
        self._producer.send_all(task_record_to_kafka(
            r, attempt_number=r.task.attempt_count + 1) for r in records)
        self._tasks.mark_queued(records, queued_time=queued_time)
        log.info("queued tasks left unqueued", extra={"count": len(records), "bucket": bucket})
        return len(records)

    def _existing(self, tenant_id: str, task_id: str) -> Created:
        stored = self._tasks.get(tenant_id, task_id)
        task = stored.record.task if stored else tasks_pb2.Task(task_id=task_id)
        task.ClearField("payload")
        return Created(task, status_pb2.Status(code=code_pb2.OK))

    def _record(self, tenant_id: str, task_id: str, request: tasks_pb2.CreateTaskRequest,
                function: functions_pb2.Function, now: datetime) -> records_pb2.TaskRecord:
        given = request.task
        task = tasks_pb2.Task(
            task_id=task_id, function=given.function, payload=given.payload,
            priority=given.priority or function.default_priority
            or common_pb2.Priority.PRIORITY_NORMAL,
            state=tasks_pb2.TaskState.TASK_STATE_ACCEPTED, labels=given.labels,
            result_targets=given.result_targets)
        task.create_time.CopyFrom(timestamp_of(now))
        task.update_time.CopyFrom(timestamp_of(now))
        if given.HasField("retry_config"):
            task.retry_config.CopyFrom(given.retry_config)
        if given.HasField("expire_time"):
            task.expire_time.CopyFrom(given.expire_time)
        elif given.HasField("max_age"):
            task.expire_time.CopyFrom(timestamp_of(now + given.max_age.ToTimedelta()))
        route = self._routes.get(tenant_id, task.function, task.priority)
        record = records_pb2.TaskRecord(
            tenant_id=tenant_id, task=task, request_id=request.request_id,
            client_task_id=bool(given.task_id), handler=function.handler, topic=route.topic,
            partition=random.choice(list(route.partitions)))
        if given.HasField("schedule_time") and given.schedule_time.ToDatetime(tzinfo=UTC) > now:
            record.task.schedule_time.CopyFrom(given.schedule_time)
            record.task.state = State.TASK_STATE_SCHEDULED
            record.next_run_time.CopyFrom(timestamp_of(to_millis(
                given.schedule_time.ToDatetime(tzinfo=UTC))))
        return record


def timers_of(records: Sequence[records_pb2.TaskRecord]) -> list[Timer]:
    """The timers new tasks need: a start for the SCHEDULED, an expiry for those with one."""
    timers = []
    for record in records:
        task = record.task
        if task.state == State.TASK_STATE_SCHEDULED:
            timers.append(Timer(record.tenant_id, task.task_id,
                                record.next_run_time.ToDatetime(tzinfo=UTC), Kind.TIMER_KIND_RUN))
        if task.HasField("expire_time"):
            timers.append(Timer(record.tenant_id, task.task_id,
                                task.expire_time.ToDatetime(tzinfo=UTC), Kind.TIMER_KIND_EXPIRE))
    return timers


def raise_for_single(created: Created) -> tasks_pb2.Task:
    """The task of a single create, or its error (ALREADY_EXISTS with the existing ID)."""
    if created.status.code == code_pb2.ALREADY_EXISTS:
        raise AlreadyExists(created.status.message, reason="TASK_ALREADY_EXISTS",
                            metadata={"task_id": created.task.task_id})
    return created.task

