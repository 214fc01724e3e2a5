"""The notifier's sender and consumer: every outcome message ends acknowledged, every
delivery recorded, whatever goes wrong on the way."""

from __future__ import annotations

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import webhooks
from services.notifier.engine import Delivery, Notifier, WebhookSender
from tests.helpers import eventually


class Deliveries:
    """The deliveries table in memory: (url, status, attempt, error) per record."""

    def __init__(self, *, broken: bool = False) -> None:
        self.records: list[tuple[str, str, int, str]] = []
        self.broken = broken

    def record(self, d: Delivery, status: str, error: str = "") -> None:
        if self.broken:
            raise RuntimeError("Cassandra is away")
        self.records.append((d.url, status, d.attempt, error))


class Done:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1


@pytest.fixture
def answering():
    """An HTTP server on 127.0.0.1 answering every POST with ``answering.status``."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(server.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status = 200
    server.url = f"http://127.0.0.1:{server.server_port}/hook"
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def sender(deliveries: Deliveries, *, allow_private: bool = True) -> WebhookSender:
    return WebhookSender(deliveries=deliveries, timeout_seconds=2, allow_private=allow_private,
                         max_attempts=3, first_backoff=timedelta(milliseconds=1),
                         max_backoff=timedelta(milliseconds=5), threads=2).start()


def send(s: WebhookSender, url: str, done: Done) -> None:
    s.send(tenant_id="t", task_id="task", url=url, headers={}, body=b"{}", done=done)


@pytest.mark.parametrize("url, says", [
    ("http://[", "invalid URL"),
    ("http://" + "a" * 1_000_000, "invalid URL"),
    ("http://127.0.0.1:9/admin", "not a public address"),
])
def test_a_delivery_that_cannot_be_made_is_failed_at_once_and_done(url, says):
    deliveries, done = Deliveries(), Done()
    s = sender(deliveries, allow_private=False)
    try:
        send(s, url, done)
        eventually(lambda: done.calls == 1, timeout=10, message="done called")
    finally:
        s.stop()
    (_, status, attempt, error), = deliveries.records
    assert (status, attempt) == ("FAILED", 1) and says in error


def test_a_failing_record_still_calls_done():
    done = Done()
    s = sender(Deliveries(broken=True))
    try:
        send(s, "http://[", done)
        eventually(lambda: done.calls == 1, timeout=10, message="done called")
    finally:
        s.stop()


def test_a_client_error_is_not_retried_and_a_server_error_is_until_the_last_attempt(answering):
    deliveries, done = Deliveries(), Done()
    s = sender(deliveries)
    try:
        answering.status = 404
        send(s, answering.url, done)
        eventually(lambda: done.calls == 1, timeout=10, message="the 404 given up")
        answering.status = 503
        send(s, answering.url + "?again", done)
        eventually(lambda: done.calls == 2, timeout=10, message="the 503 given up")
    finally:
        s.stop()
    assert [(st, n) for _, st, n, _ in deliveries.records] == [
        ("FAILED", 1), ("PENDING", 1), ("PENDING", 2), ("FAILED", 3)]
    assert deliveries.records[0][3] == "HTTP 404" and deliveries.records[-1][3] == "HTTP 503"


class Message:
    def __init__(self, value: bytes) -> None:
        self.value, self.partition, self.offset = value, 0, 7
        self.acks = 0

    def ack(self) -> None:
        self.acks += 1

    def nack(self) -> None:
        raise AssertionError("nacked")


class Functions:
    def __init__(self, *targets: common_pb2.ResultTarget) -> None:
        self.function = functions_pb2.Function(name="echo", result_targets=targets)

    def get(self, tenant_id: str, name: str) -> functions_pb2.Function:
        return self.function


class Tenants:
    def get_tenant(self, tenant_id: str) -> None:
        return None


class Watchers:
    def notify(self, key: tuple[str, str]) -> None:
        pass


def notifier(s: WebhookSender, *targets: common_pb2.ResultTarget) -> Notifier:
    # Stand-ins for the stores and the consumer: `handle` is called directly.
    return Notifier(consumer=None, tenants=Tenants(), functions=Functions(*targets), sender=s,
                    watchers=Watchers())


def test_a_message_that_cannot_be_parsed_is_acknowledged():
    message = Message(b"\xff\xff\xff not a protobuf")
    notifier(sender(Deliveries())).handle(message)
    assert message.acks == 1


def test_an_outcome_with_refused_targets_is_acknowledged_once_all_are_recorded(answering):
    deliveries = Deliveries()
    s = sender(deliveries)
    targets = [common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(url="http://[")),
               common_pb2.ResultTarget(kafka=common_pb2.KafkaTarget(topic="weir.tasks.high")),
               common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(
                   url=answering.url + "?forged", headers={"weir-signature": "forged"})),
               common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(url=answering.url))]
    outcome = records_pb2.AttemptOutcome(tenant_id="t", task_id="task", function="echo",
                                         state=tasks_pb2.TaskState.TASK_STATE_SUCCEEDED)
    message = Message(records_pb2.AttemptOutcomeBatch(outcomes=[outcome]).SerializeToString())
    try:
        notifier(s, *targets).handle(message)
        eventually(lambda: message.acks == 1, timeout=10, message="the outcome acknowledged")
    finally:
        s.stop()
    assert sorted((url, status, error) for url, status, _, error in deliveries.records) == [
        (answering.url, "DELIVERED", ""),
        (answering.url + "?forged", "FAILED",
         "headers['weir-signature']: Weir-* headers are reserved"),
        ("http://[", "FAILED", "invalid URL: not a valid URL (Invalid IPv6 URL): 'http://['"),
        ("kafka:weir.tasks.high", "FAILED", webhooks.KAFKA_REFUSED)]
    assert message.acks == 1


def test_deliveries_are_counted_by_outcome_and_timed(answering):
    from prometheus_client import CollectorRegistry

    from services.notifier.metrics import NotifierMetrics

    registry = CollectorRegistry()
    s = WebhookSender(deliveries=Deliveries(), timeout_seconds=2, allow_private=True,
                      max_attempts=2, first_backoff=timedelta(milliseconds=1),
                      max_backoff=timedelta(milliseconds=5), threads=2,
                      metrics=NotifierMetrics(registry)).start()

    def count(outcome: str) -> float:
        return registry.get_sample_value("weir_webhook_deliveries_total", {"outcome": outcome})

    try:
        assert [count(o) for o in ("delivered", "retried", "failed", "refused")] == [0] * 4
        done = Done()
        send(s, answering.url, done)
        eventually(lambda: done.calls == 1)
        answering.status = 503  # retried once, then given up (max_attempts=2)
        send(s, answering.url, done)
        eventually(lambda: done.calls == 2)
        s.refuse(tenant_id="t", task_id="task", target="kafka:topic", error="no", done=done)
        eventually(lambda: done.calls == 3)
    finally:
        s.stop()
    assert [count(o) for o in ("delivered", "retried", "failed", "refused")] == [1, 1, 1, 1]
    assert registry.get_sample_value("weir_webhook_request_seconds_count") == 3
