"""Delivering outcomes: signed webhooks with retries, and live task event streams."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from cassandra.cluster import Session
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanKind
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs import logs, tracing, webhooks
from libs.cache import TtlCache
from libs.cassandra.functions import FunctionStore
from libs.cassandra.taskstate import FINAL_STATES, now_utc
from libs.cassandra.tenants import TenantStore
from libs.errors import excerpt
from libs.kafka.acks import Countdown
from libs.kafka.client import Consumer, ConsumerLoop, Message
from libs.schedule import Schedule
from services.notifier.metrics import NotifierMetrics
from services.notifier.watch import Watchers

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Weir-Signature"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def webhook_body(outcome: records_pb2.AttemptOutcome) -> bytes:
    """The JSON a webhook receives: the task's final state, result and last attempt."""
    return json.dumps({
        "task_id": outcome.task_id,
        "function": outcome.function,
        "state": tasks_pb2.TaskState.Name(outcome.state),
        "result": base64.b64encode(outcome.result).decode(),
        "attempt": json_format.MessageToDict(outcome.attempt),
    }, sort_keys=True).encode()


def delivery_backoff(attempt: int, *, first: timedelta, most: timedelta) -> timedelta:
    """Delay before webhook retry ``attempt`` (1-based): doubling from ``first``, capped."""
    return min(first * (2 ** (attempt - 1)), most)


@dataclass
class Delivery:
    due: float  # time.monotonic() of the next attempt
    tenant_id: str
    task_id: str
    url: str  # or `kafka:<topic>` for a target that is refused
    headers: dict[str, str]
    body: bytes
    attempt: int = 1
    done: Callable[[], None] = lambda: None
    trace_context: Mapping[str, str] = field(default_factory=dict)  # the task's


class DeliveryStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._upsert = session.prepare(
            "INSERT INTO deliveries (tenant_id, task_id, target, status, attempts, last_error, "
            "update_time) VALUES (?, ?, ?, ?, ?, ?, ?)")

    def record(self, d: Delivery, status: str, error: str = "") -> None:
        # The target is part of the key; an over-long URL (refused anyway) is cut to fit.
        target = d.url if len(d.url) <= webhooks.MAX_URL_CHARS else (
            f"{d.url[:webhooks.MAX_URL_CHARS]}… ({len(d.url)} characters)")
        self._session.execute(self._upsert, (d.tenant_id, d.task_id, target, status, d.attempt,
                                             error, now_utc()))


class WebhookSender:
    """Posts webhooks from a pool; retries wait in a schedule, never in a pool thread, so a
    receiver that keeps failing cannot hold up deliveries to the others.

    Every delivery ends DELIVERED or FAILED in the `deliveries` table and then calls its
    ``done``, whatever goes wrong on the way. Retried, up to ``max_attempts`` in all: a
    timeout, a connection or lookup failure, HTTP 5xx, 408, 425 and 429. Failed at once,
    since the same request would fail again: a malformed URL or header, an address the
    policy refuses (`libs.webhooks`), a redirect (3xx, never followed), any other 4xx, and
    an unexpected error of our own.
    """

    def __init__(self, *, deliveries: DeliveryStore, timeout_seconds: float,
                 allow_private: bool = False, max_attempts: int = 8,
                 first_backoff: timedelta = timedelta(milliseconds=200),
                 max_backoff: timedelta = timedelta(minutes=5), threads: int = 16,
                 metrics: NotifierMetrics | None = None) -> None:
        self._deliveries = deliveries
        self._metrics = metrics
        self._timeout = timeout_seconds
        self._allow_private = allow_private
        self._max_attempts = max_attempts
        self._first = first_backoff
        self._most = max_backoff
        self._schedule = Schedule(name="webhook", threads=threads)

    def start(self) -> WebhookSender:
        self._schedule.start()
        return self

    def stop(self) -> None:
        self._schedule.stop()

    def send(self, *, tenant_id: str, task_id: str, url: str, headers: dict[str, str],
             body: bytes, done: Callable[[], None],
             trace_context: Mapping[str, str] | None = None) -> None:
        self._enqueue(Delivery(time.monotonic(), tenant_id, task_id, url, headers, body,
                               done=done, trace_context=trace_context or {}))

    def refuse(self, *, tenant_id: str, task_id: str, target: str, error: str,
               done: Callable[[], None]) -> None:
        """Records a target that is not even attempted as FAILED with ``error``."""
        delivery = Delivery(time.monotonic(), tenant_id, task_id, target, {}, b"", done=done)
        self._schedule.at(delivery.due, lambda: self._give_up(delivery, error,
                                                              outcome="refused"))

    def _enqueue(self, delivery: Delivery) -> None:
        self._schedule.at(delivery.due, lambda: self._post(delivery))

    def _post(self, d: Delivery) -> None:
        span = tracing.start(d.trace_context, "webhook.post", kind=SpanKind.CLIENT,
                             attributes={"weir.delivery_attempt": d.attempt})
        # The receiver may continue the task's trace (W3C); an unsampled one names it only.
        traced = tracing.carrier_of(span) if span is not None else d.trace_context
        try:
            self._request(d, traced)
        except webhooks.DeliveryError as exc:
            if span is not None:
                tracing.end_with(span, error=str(exc))
            if exc.permanent or d.attempt >= self._max_attempts:
                self._give_up(d, str(exc))
            else:
                self._retry_later(d, str(exc))
        except Exception as exc:  # a bug of ours: fail the delivery rather than stall the topic
            log.exception("webhook delivery broke", extra={"url": excerpt(d.url, 200),
                                                           "task_id": d.task_id})
            self._give_up(d, f"internal error ({type(exc).__name__})")
        else:
            if span is not None:
                span.end()
            if self._metrics is not None:
                self._metrics.delivery("delivered")
            self._finish(d, "DELIVERED")

    def _request(self, d: Delivery, traced: Mapping[str, str]) -> None:
        began = time.monotonic()
        try:
            webhooks.post(d.url, d.body, timeout=self._timeout, allow_private=self._allow_private,
                          headers={**d.headers, **traced, "Content-Type": "application/json",
                                   "Weir-Delivery-Attempt": str(d.attempt)})
        finally:
            if self._metrics is not None:
                self._metrics.request(time.monotonic() - began)

    def _retry_later(self, d: Delivery, error: str) -> None:
        if self._metrics is not None:
            self._metrics.delivery("retried")
        try:
            self._deliveries.record(d, "PENDING", error)
        except Exception:  # the retry matters more than its interim record
            log.exception("could not record a pending webhook", extra={"task_id": d.task_id})
        delay = delivery_backoff(d.attempt, first=self._first, most=self._most)
        d.attempt += 1
        d.due = time.monotonic() + delay.total_seconds()
        self._enqueue(d)

    def _give_up(self, d: Delivery, error: str, *, outcome: str = "failed") -> None:
        if self._metrics is not None:
            self._metrics.delivery(outcome)
        log.warning("webhook given up", extra={
            "url": excerpt(d.url, 200), "error": error,
            **logs.task_fields(d.tenant_id, d.task_id, d.trace_context)})
        self._finish(d, "FAILED", error)

    def _finish(self, d: Delivery, status: str, error: str = "") -> None:
        """Records the final status (best effort: a failed write is logged) and calls done."""
        try:
            self._deliveries.record(d, status, error)
        except Exception:
            log.exception("could not record a webhook delivery",
                          extra={"task_id": d.task_id, "status": status})
        finally:
            d.done()


class Notifier:
    """Consumes attempt outcomes: wakes watchers, and delivers final outcomes to webhooks.

    A message is acknowledged once every target of its task has been delivered or given
    up, so a crash redelivers it (webhooks are at-least-once; receivers dedup by task ID).
    A message that cannot be parsed is logged and acknowledged: it would fail forever and
    hold up its partition's commits (so is a function record that cannot be parsed: its
    targets are skipped). A failure to read the function or tenant (Cassandra unreachable)
    raises, which nacks the message: it comes again.
    The outcome carries the task's targets; functions and tenants are cached: a changed
    function's targets apply once the change feed reports it (`function_changed`), a changed
    tenant webhook secret within ``cache_seconds``.
    """

    def __init__(self, *, consumer: Consumer, tenants: TenantStore, functions: FunctionStore,
                 sender: WebhookSender, watchers: Watchers, cache_seconds: float = 5.0,
                 on_death: Callable[[], None] = lambda: None) -> None:
        self._tenants = TtlCache(tenants.get_tenant, ttl=cache_seconds)
        self._functions = TtlCache(functions.get, ttl=cache_seconds)
        self._sender = sender
        self._watchers = watchers
        self._loop = ConsumerLoop(consumer, self.handle, name="notifier",
                                  on_death=lambda exc: on_death())

    def start(self) -> Notifier:
        self._loop.start()
        return self

    def function_changed(self, tenant_id: str, name: str) -> None:
        self._functions.forget(tenant_id, name)

    def functions_lost(self) -> None:
        self._functions.clear()

    def stop(self) -> None:
        self._loop.stop()

    def handle(self, message: Message) -> None:
        """One record: the outcomes an owner flushed together. Acknowledged once every
        delivery of every final outcome in it is done (or given up)."""
        try:
            batch = records_pb2.AttemptOutcomeBatch.FromString(message.value)
        except DecodeError:
            log.error("an outcome record that cannot be parsed is skipped", extra={
                "partition": message.partition, "offset": message.offset})
            message.ack()
            return
        deliveries: list[Callable[[Callable[[], None]], None]] = []
        for outcome in batch.outcomes:
            span = tracing.start(outcome.trace_context, "weir.notify", kind=SpanKind.CONSUMER,
                                 attributes={"weir.state": outcome.state})
            self._watchers.notify((outcome.tenant_id, outcome.task_id))
            if outcome.state in FINAL_STATES:
                found = self._deliveries(outcome)
                deliveries += found
                if span is not None:
                    span.set_attribute("weir.deliveries", len(found))
            if span is not None:
                span.end()
        if not deliveries:
            message.ack()
            return
        # Nothing below raises: once handed out, every delivery calls done, the last acks.
        pending = Countdown(len(deliveries), message.ack)
        for deliver in deliveries:
            deliver(pending.tick)

    def _deliveries(self, outcome: records_pb2.AttemptOutcome
                    ) -> list[Callable[[Callable[[], None]], None]]:
        """The deliveries a final outcome needs, each to start with its done callback."""
        try:
            function = self._functions.get(outcome.tenant_id, outcome.function)
        except DecodeError:  # a corrupt record would fail forever: deliver the task's targets
            log.error("the function record cannot be parsed; its targets are skipped", extra={
                "tenant_id": outcome.tenant_id, "function": outcome.function})
            function = None
        targets = [*outcome.result_targets, *(function.result_targets if function else [])]
        urls = {t.webhook.url: dict(t.webhook.headers) for t in targets if t.HasField("webhook")}
        topics = {t.kafka.topic for t in targets if t.HasField("kafka")}
        if not urls and not topics:
            return []
        tenant = self._tenants.get(outcome.tenant_id) if urls else None
        body = webhook_body(outcome)
        signature = sign(tenant.webhook_secret if tenant else b"", body)
        tenant_id, task_id = outcome.tenant_id, outcome.task_id
        deliveries: list[Callable[[Callable[[], None]], None]] = []
        # Defs, not lambdas: mypy cannot type a lambda whose defaults bind the loop variables.
        for topic in topics:  # stored before they were refused at submission
            def refuse_topic(done: Callable[[], None], t: str = topic) -> None:
                self._sender.refuse(tenant_id=tenant_id, task_id=task_id, target=f"kafka:{t}",
                                    error=webhooks.KAFKA_REFUSED, done=done)
            deliveries.append(refuse_topic)
        for url, headers in urls.items():
            bad_header = webhooks.header_violation(headers)
            if bad_header:
                where, problem = bad_header

                def refuse_url(done: Callable[[], None], u: str = url,
                               e: str = f"headers{where}: {problem}") -> None:
                    self._sender.refuse(tenant_id=tenant_id, task_id=task_id, target=u,
                                        error=e, done=done)
                deliveries.append(refuse_url)
                continue

            def send(done: Callable[[], None], u: str = url,
                     h: dict[str, str] = headers) -> None:
                self._sender.send(
                    tenant_id=tenant_id, task_id=task_id, url=u,
                    headers={**h, SIGNATURE_HEADER: signature, "Weir-Task-Id": task_id},
                    body=body, done=done, trace_context=dict(outcome.trace_context))
            deliveries.append(send)
        return deliveries
