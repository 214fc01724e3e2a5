import hashlib
import hmac
import json
from datetime import timedelta

from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from services.notifier.engine import delivery_backoff, sign, webhook_body


def test_the_signature_is_hmac_sha256_of_the_exact_body():
    body = b'{"task_id": "t1"}'
    expected = hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert sign(b"secret", body) == f"sha256={expected}"
    assert sign(b"other", body) != sign(b"secret", body)


def test_the_body_carries_state_and_result_as_base64():
    body = json.loads(webhook_body(records_pb2.AttemptOutcome(
        task_id="t1", function="echo", result=b"hi",
        state=tasks_pb2.TaskState.TASK_STATE_SUCCEEDED)))
    assert body["state"] == "TASK_STATE_SUCCEEDED" and body["result"] == "aGk="


def test_retry_delays_double_and_are_capped():
    delays = [delivery_backoff(n, first=timedelta(seconds=1), most=timedelta(seconds=10))
              for n in range(1, 7)]
    assert delays == [timedelta(seconds=s) for s in (1, 2, 4, 8, 10, 10)]
