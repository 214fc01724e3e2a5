"""Webhook delivery: signed, retried with backoff, and a failing receiver delays no one;
bad targets are refused at submission, and one that slipped into storage fails alone."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2

from libs import errors
from libs.cassandra.functions import FunctionStore
from libs.cassandra.tenants import TenantStore
from libs.kafka.topics import results_topic
from tests.helpers import eventually


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every POST and answers ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.posts: list[tuple[float, dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((time.monotonic(), dict(self.headers), body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def task_ids(self) -> set[str]:
        return {json.loads(body)["task_id"] for _, _, body in self.posts}


@pytest.fixture
def receivers():
    good, bad = Receiver(200), Receiver(500)
    yield good, bad
    good.close()
    bad.close()


def target(url: str) -> common_pb2.ResultTarget:
    return common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(url=url))


def test_each_result_reaches_the_webhook_signed_and_a_failing_one_is_retried_apart(
        suite, cassandra, tenant, receivers):
    tenant_id, api_key = tenant
    good, bad = receivers
    secret = TenantStore(cassandra).get_tenant(tenant_id).webhook_secret
    with suite.client(api_key) as client:
        created = [client.create_task("echo", f"p{i}".encode(),
                                      result_targets=[target(bad.url), target(good.url)])
                   for i in range(10)]
        ids = [task.task_id for task in created]
        for task_id in ids:
            client.wait(task_id, timeout=60)
    finished = time.monotonic()
    traces = {task.task_id: task.trace_id for task in created}

    eventually(lambda: good.task_ids() >= set(ids), timeout=30,
               message="every result delivered to the good receiver")
    for _, headers, body in good.posts:
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["Weir-Signature"], expected)
        payload = json.loads(body)
        assert payload["state"] == "TASK_STATE_SUCCEEDED"
        # The receiver can continue the task's trace (W3C traceparent).
        assert headers["traceparent"].split("-")[1] == traces[payload["task_id"]]
        assert base64.b64decode(payload["result"]) == f"p{ids.index(payload['task_id'])}".encode()
    # The good receiver was served within seconds, while the bad one is still being retried.
    assert max(t for t, _, _ in good.posts) - finished < 10

    def retried():
        attempts = [int(h["Weir-Delivery-Attempt"]) for _, h, _ in bad.posts]
        return max(attempts, default=0) >= 3

    eventually(retried, timeout=30, message="the failing receiver retried with backoff")
    first_task = json.loads(bad.posts[0][2])["task_id"]
    times = [t for t, _, body in bad.posts if json.loads(body)["task_id"] == first_task]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps and all(later >= earlier * 1.3 for earlier, later in zip(gaps, gaps[1:],
                                                                          strict=False))


def test_delivery_status_is_recorded(suite, cassandra, tenant, receivers):
    _, api_key = tenant
    good, _ = receivers
    with suite.client(api_key) as client:
        task_id = client.create_task("echo", b"x", result_targets=[target(good.url)]).task_id
        client.wait(task_id, timeout=60)

    def delivered():
        row = cassandra.execute("SELECT status, attempts FROM deliveries WHERE tenant_id = %s "
                                "AND task_id = %s", (tenant[0], task_id)).one()
        return row if row and row.status == "DELIVERED" else None

    assert eventually(delivered, timeout=30).attempts == 1


@pytest.mark.parametrize("bad, says", [
    (target("http://["), "not a valid URL"),
    (target("http://example.com/" + "a" * 1_000_000), "at most 2,048 characters"),
    (common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(
        url="http://127.0.0.1:9/hook", headers={"weir-signature": "sha256=forged"})),
     "reserved"),
    (common_pb2.ResultTarget(kafka=common_pb2.KafkaTarget(topic="weir.tasks.high")),
     "not delivered yet"),
    (common_pb2.ResultTarget(), "set webhook or kafka"),
], ids=["malformed-url", "megabyte-url", "reserved-header", "kafka-target", "empty-target"])
def test_a_task_or_function_with_a_bad_result_target_cannot_be_created(suite, tenant, bad, says):
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_task("echo", b"x", result_targets=[bad])
        (field, problem), = raised.value.violations.items()
        assert field.startswith("task.result_targets[0]") and says in problem
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_function("hooked", "examples.demo:echo", result_targets=[bad])
        (field, problem), = raised.value.violations.items()
        assert field.startswith("function.result_targets[0]") and says in problem
        assert list(client.list_tasks()) == []


def results_position(config, task_id: str) -> tuple[int, int, int]:
    """(partition, offset, partitions of the topic) of the task's last outcome on the results
    topic, read from Kafka itself."""
    topic = results_topic(config.topic_prefix)
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap.split(","),
                             enable_auto_commit=False, consumer_timeout_ms=2000)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        found = [(m.partition, m.offset) for m in consumer
                 if any(o.task_id == task_id for o in records_pb2.AttemptOutcomeBatch.FromString(
                     m.value).outcomes)]
        assert found, f"no outcome of {task_id} on {topic}"
        return (*found[-1], len(partitions))
    finally:
        consumer.close()


def committed_offset(config, partition: int) -> int:
    """The notifiers' committed offset on one results partition (-1 before any commit)."""
    group = f"{config.topic_prefix}-notifiers"
    admin = KafkaAdminClient(bootstrap_servers=config.kafka_bootstrap.split(","))
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    position = offsets.get(TopicPartition(results_topic(config.topic_prefix), partition))
    return position.offset if position else -1


def test_a_stored_webhook_that_cannot_be_sent_is_recorded_failed_and_its_partition_moves_on(
        suite, cassandra, tenant, receivers):
    tenant_id, api_key = tenant
    good, _ = receivers
    # Stored as if the gateway had let it through (records from before the rules, say).
    functions = FunctionStore(cassandra)
    echo = functions.get(tenant_id, "echo")
    echo.result_targets.append(target("http://["))
    assert functions.update(tenant_id, echo)

    def delivery(task_id: str):
        return cassandra.execute("SELECT status, last_error FROM deliveries WHERE tenant_id = %s "
                                 "AND task_id = %s AND target = %s",
                                 (tenant_id, task_id, "http://[")).one()

    with suite.client(api_key) as client:
        bad_id = client.create_task("echo", b"bad").task_id
        client.wait(bad_id, timeout=60)
        failed = eventually(lambda: delivery(bad_id), timeout=30, message="delivery recorded")
        assert failed.status == "FAILED" and "invalid URL" in failed.last_error
        partition, bad_offset, _ = results_position(suite.config, bad_id)

        # Later outcomes (owners spread their records over the results partitions) are still
        # delivered, and the commit moves past the bad one.
        later = [client.create_task("echo", b"later", result_targets=[target(good.url)]).task_id
                 for _ in range(8)]
        for later_id in later:
            client.wait(later_id, timeout=60)
    eventually(lambda: set(later) <= set(good.task_ids()), timeout=30,
               message="the later outcomes delivered to the good receiver")
    # Earlier tests' failing webhooks may still hold the commit back while they are retried.
    eventually(lambda: committed_offset(suite.config, partition) > bad_offset, timeout=90,
               message="the notifiers' commit moved past the failed outcome")
