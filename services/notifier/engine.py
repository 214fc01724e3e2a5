"""Delivering outcomes: signed webhooks with retries, and live task event streams."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from cassandra.cluster import Session
from google.protobuf import json_format
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cache import TtlCache
from libs.cassandra.functions import FunctionStore
from libs.cassandra.tasks import FINAL_STATES, TaskStore, now_utc
from libs.cassandra.tenants import TenantStore
from libs.kafka.client import Consumer, ConsumerLoop, Message
from libs.schedule import Schedule

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


class Watchers:
    """Wakes the streams watching a task when news of it arrives."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], set[threading.Event]] = {}
        self._lock = threading.Lock()

    def subscribe(self, key: tuple[str, str]) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(key, set()).add(event)
        return event

    def unsubscribe(self, key: tuple[str, str], event: threading.Event) -> None:
        with self._lock:
            events = self._events.get(key, set())
            events.discard(event)
            if not events:
                self._events.pop(key, None)

    def notify(self, key: tuple[str, str]) -> None:
        with self._lock:
            events = list(self._events.get(key, ()))
        for event in events:
            event.set()


def watch(tasks: TaskStore, watchers: Watchers, tenant_id: str, task_id: str, *,
          active: Callable[[], bool], poll_seconds: float = 0.25
          ) -> Iterator[records_pb2.TaskEvent]:
    """Every stage of the task so far, then each new one, until a final stage.

    Stages are read from the task's timeline (written by every service); an outcome on the
    results topic wakes the stream at once, else it looks again every ``poll_seconds``.
    """
    key = (tenant_id, task_id)
    wake = watchers.subscribe(key)
    sent: set[tuple[int, int, int]] = set()
    try:
        while active():
            wake.clear()
            for stage in tasks.stages(tenant_id, task_id):
                mark = (stage.state, stage.time.seconds, stage.time.nanos)
                if mark in sent:
                    continue
                sent.add(mark)
                yield records_pb2.TaskEvent(tenant_id=tenant_id, task_id=task_id, stage=stage)
                if stage.state in FINAL_STATES:
                    return
            wake.wait(poll_seconds)
    finally:
        watchers.unsubscribe(key, wake)


@dataclass
class Delivery:
    due: float  # time.monotonic() of the next attempt
    tenant_id: str
    task_id: str
    url: str
    headers: dict
    body: bytes
    attempt: int = 1
    done: Callable[[], None] = lambda: None


class DeliveryStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._upsert = session.prepare(
            "INSERT INTO deliveries (tenant_id, task_id, target, status, attempts, last_error, "
            "update_time) VALUES (?, ?, ?, ?, ?, ?, ?)")

    def record(self, d: Delivery, status: str, error: str = "") -> None:
        self._session.execute(self._upsert, (d.tenant_id, d.task_id, d.url, status, d.attempt,
                                             error, now_utc()))


class WebhookSender:
    """Posts webhooks from a pool; retries wait in a schedule, never in a pool thread, so a
    receiver that keeps failing cannot hold up deliveries to the others."""

    def __init__(self, *, deliveries: DeliveryStore, timeout_seconds: float,
                 max_attempts: int = 8, first_backoff: timedelta = timedelta(milliseconds=200),
                 max_backoff: timedelta = timedelta(minutes=5), threads: int = 16) -> None:
        self._deliveries = deliveries
        self._timeout = timeout_seconds
        self._max_attempts = max_attempts
        self._first = first_backoff
        self._most = max_backoff
        self._schedule = Schedule(name="webhook", threads=threads)

    def start(self) -> WebhookSender:
        self._schedule.start()
        return self

    def stop(self) -> None:
        self._schedule.stop()

    def send(self, *, tenant_id: str, task_id: str, url: str, headers: dict, body: bytes,
             done: Callable[[], None]) -> None:
        self._enqueue(Delivery(time.monotonic(), tenant_id, task_id, url, headers, body,
                               done=done))

    def _enqueue(self, delivery: Delivery) -> None:
        self._schedule.at(delivery.due, lambda: self._post(delivery))

    def _post(self, d: Delivery) -> None:
        request = urllib.request.Request(d.url, data=d.body, method="POST", headers={
            **d.headers, "Content-Type": "application/json",
            "Weir-Delivery-Attempt": str(d.attempt)})
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                ok, error = 200 <= response.status < 300, f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            ok, error = False, f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            ok, error = False, str(exc)
        if ok:
            self._deliveries.record(d, "DELIVERED")
            d.done()
        elif d.attempt >= self._max_attempts:
            self._deliveries.record(d, "FAILED", error)
            log.warning("webhook given up", extra={"url": d.url, "task_id": d.task_id,
                                                   "error": error})
            d.done()
        else:
            self._deliveries.record(d, "PENDING", error)
            delay = delivery_backoff(d.attempt, first=self._first, most=self._most)
            d.attempt += 1
            d.due = time.monotonic() + delay.total_seconds()
            self._enqueue(d)


class Notifier:
    """Consumes attempt outcomes: wakes watchers, and delivers final outcomes to webhooks.

    A message is acknowledged once every webhook of its task has been delivered or given
    up, so a crash redelivers it (webhooks are at-least-once; receivers dedup by task ID).
    The outcome carries the task's targets; functions and tenants are cached, so a changed
    function target or webhook secret applies within ``cache_seconds``.
    """

    def __init__(self, *, consumer: Consumer, tenants: TenantStore, functions: FunctionStore,
                 sender: WebhookSender, watchers: Watchers, cache_seconds: float = 5.0) -> None:
        self._tenants = TtlCache(tenants.get_tenant, ttl=cache_seconds)
        self._functions = TtlCache(functions.get, ttl=cache_seconds)
        self._sender = sender
        self._watchers = watchers
        self._loop = ConsumerLoop(consumer, self.handle, name="notifier")

    def start(self) -> Notifier:
        self._loop.start()
        return self

    def stop(self) -> None:
        self._loop.stop()

    def handle(self, message: Message) -> None:
        outcome = records_pb2.AttemptOutcome.FromString(message.value)
        self._watchers.notify((outcome.tenant_id, outcome.task_id))
        if outcome.state not in FINAL_STATES:
            message.ack()
            return
        function = self._functions.get(outcome.tenant_id, outcome.function)
        targets = [*outcome.result_targets, *(function.result_targets if function else [])]
        urls = {t.webhook.url: dict(t.webhook.headers) for t in targets if t.HasField("webhook")}
        if not urls:
            message.ack()
            return
        tenant = self._tenants.get(outcome.tenant_id)
        body = webhook_body(outcome)
        signature = sign(tenant.webhook_secret if tenant else b"", body)
        remaining = [len(urls)]
        lock = threading.Lock()

        def one_done() -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    message.ack()

        for url, headers in urls.items():
            self._sender.send(tenant_id=outcome.tenant_id, task_id=outcome.task_id, url=url,
                              headers={**headers, SIGNATURE_HEADER: signature,
                                       "Weir-Task-Id": outcome.task_id},
                              body=body, done=one_done)
