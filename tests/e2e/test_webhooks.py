"""Webhook delivery: signed, retried with backoff, and a failing receiver delays no one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from weir.v1 import common_pb2

from libs.cassandra.tenants import TenantStore
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
        ids = [client.create_task("echo", f"p{i}".encode(),
                                  result_targets=[target(bad.url), target(good.url)]).task_id
               for i in range(10)]
        for task_id in ids:
            client.wait(task_id, timeout=60)
    finished = time.monotonic()

    eventually(lambda: good.task_ids() >= set(ids), timeout=30,
               message="every result delivered to the good receiver")
    for _, headers, body in good.posts:
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["Weir-Signature"], expected)
        payload = json.loads(body)
        assert payload["state"] == "TASK_STATE_SUCCEEDED"
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
