"""Attempt logs across the five services: a handler's stdout, stderr and logging records are
captured in its worker, carried by the executor-manager to the dispatcher, stored with the
attempt's outcome, and read back through the public API (gRPC, the SDK, grpcurl) by the
task's tenant only."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from weir.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

from libs import errors
from libs.cassandra.attempt_logs import AttemptLogStore
from tests.helpers import unique
from tests.interop.test_grpcurl import grpcurl

State = tasks_pb2.TaskState
CAP = 64 * 1024  # WEIR_ATTEMPT_LOG_MAX_BYTES's default, which the suite runs with


def talking(client, **retry) -> str:
    """A fresh function of ``tests.handlers:talk``."""
    name = unique("talk").replace("_", "-")
    config = common_pb2.RetryConfig(**{
        k: duration_pb2.Duration(nanos=int(v * 1e9)) if isinstance(v, float) else v
        for k, v in retry.items()})
    client.create_function(name, "tests.handlers:talk", retry_config=config,
                           worker_concurrency=8)
    return name


def run(client, function: str, **spec) -> tasks_pb2.Task:
    task = client.create_task(function, json.dumps(spec).encode())
    return client.wait(task.task_id, timeout=60)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def violations(error: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(error)
    found = set()
    for detail in status.details if status else ():
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            found |= {v.field for v in request.field_violations}
    return found


def test_a_printed_line_is_read_back_through_grpc_and_the_sdk(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = talking(client)
        done = run(client, function, say="hello from the handler")
        assert done.state == State.TASK_STATE_SUCCEEDED, done.last_status
        ended = done.attempts[0].end_time.ToDatetime()

        channel = grpc.insecure_channel(suite.address("gateway"))
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        metadata = [("authorization", f"Bearer {api_key}")]
        log = stub.GetAttemptLog(tasks_pb2.GetAttemptLogRequest(
            task_id=done.task_id, attempt_number=1), metadata=metadata, timeout=10)
        lines = log.text.splitlines()
        assert lines[:2] == ["hello from the handler (attempt 1)", "on stderr (attempt 1)"]
        assert lines[2].endswith(" INFO tests.handlers.talk: logged (attempt 1)")
        assert len(lines) == 3
        assert (log.task_id, log.attempt_number) == (done.task_id, 1)
        assert not log.truncated and log.original_bytes == len(log.text.encode())
        assert abs(log.create_time.ToDatetime() - ended) < timedelta(seconds=1)
        retention = log.expire_time.ToDatetime() - log.create_time.ToDatetime()
        assert timedelta(days=7) - timedelta(minutes=1) < retention < \
            timedelta(days=7) + timedelta(minutes=1)

        assert client.get_attempt_log(done.task_id, 1) == log
        assert list(client.list_attempt_logs(done.task_id)) == [log]

        # An attempt the task never had; malformed requests name their field.
        beyond = rpc_error(lambda: stub.GetAttemptLog(tasks_pb2.GetAttemptLogRequest(
            task_id=done.task_id, attempt_number=2), metadata=metadata, timeout=10))
        assert beyond.code() == grpc.StatusCode.NOT_FOUND
        bad = rpc_error(lambda: stub.GetAttemptLog(tasks_pb2.GetAttemptLogRequest(
            task_id="no spaces allowed", attempt_number=0), metadata=metadata, timeout=10))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(bad) == {"task_id", "attempt_number"}
        bad_page = rpc_error(lambda: stub.ListAttemptLogs(tasks_pb2.ListAttemptLogsRequest(
            task_id=done.task_id, page_size=101), metadata=metadata, timeout=10))
        assert violations(bad_page) == {"page_size"}
        channel.close()


def test_another_tenant_gets_not_found(suite, tenant_factory):
    (_, owner_key), (_, other_key) = tenant_factory(), tenant_factory()
    with suite.client(owner_key) as owner, suite.client(other_key) as other:
        done = run(owner, talking(owner), say="private")
        assert owner.get_attempt_log(done.task_id, 1).text.startswith("private")
        with pytest.raises(errors.NotFound):
            other.get_attempt_log(done.task_id, 1)
        with pytest.raises(errors.NotFound):
            list(other.list_attempt_logs(done.task_id))
        with pytest.raises(errors.NotFound):
            owner.get_attempt_log(unique("never-created"), 1)


def test_a_retried_task_has_one_log_per_attempt_each_its_own(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = talking(client, max_attempts=5, min_backoff=0.2)
        done = run(client, function, say="trying", fail_before=3)
        assert done.state == State.TASK_STATE_SUCCEEDED and len(done.attempts) == 3
        logs = list(client.list_attempt_logs(done.task_id))
        assert [log.attempt_number for log in logs] == [1, 2, 3]
        for number, log in enumerate(logs, start=1):
            assert log.text.startswith(f"trying (attempt {number})\n")
            assert all(f"(attempt {other})" not in log.text for other in {1, 2, 3} - {number})
        for failed in logs[:2]:  # a handler that raised: the traceback ends its log
            assert "Traceback (most recent call last)" in failed.text
            assert failed.text.rstrip().endswith(
                f"RetryableError: attempt {failed.attempt_number} fails on purpose")
        assert "Traceback" not in logs[2].text
        # One by one, each page's token leads to the next.
        paged, token = [], ""
        while True:
            page = client._call(client._tasks.ListAttemptLogs, tasks_pb2.ListAttemptLogsRequest(
                task_id=done.task_id, page_size=1, page_token=token))
            paged += page.attempt_logs
            token = page.next_page_token
            if not token:
                break
        assert paged == logs


def test_an_oversized_output_comes_back_truncated_with_its_head_and_tail(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        done = run(client, talking(client), say="first words", bytes=300_000)
        assert done.state == State.TASK_STATE_SUCCEEDED, done.last_status
        log = client.get_attempt_log(done.task_id, 1)
    assert log.truncated and log.original_bytes > 300_000
    assert len(log.text.encode()) <= CAP
    assert log.text.startswith("first words (attempt 1)\non stderr (attempt 1)\n")
    assert log.text.endswith("the last line\n")
    head, marker, tail = log.text.partition("\n[… ")
    assert marker and " bytes dropped …]\n" in tail
    dropped = int(tail.split(" bytes dropped")[0].replace(",", ""))
    assert dropped == log.original_bytes - len(log.text.encode()) + \
        len(f"\n[… {dropped:,} bytes dropped …]\n".encode())


def test_attempts_running_side_by_side_in_one_worker_keep_their_own_output(suite, tenant):
    """Sixteen tasks of a function whose worker runs eight at once print their own line
    twenty times, pausing between lines: no log holds another's line."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = talking(client)
        created = [client.create_task(function, json.dumps(
            {"say": f"task {i}", "lines": 20, "pause_ms": 5}).encode()) for i in range(16)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            done = list(pool.map(lambda t: client.wait(t.task_id, timeout=60), created))
        assert {d.state for d in done} == {State.TASK_STATE_SUCCEEDED}
        for i, task in enumerate(created):
            lines = client.get_attempt_log(task.task_id, 1).text.splitlines()
            assert lines[:20] == [f"task {i} (attempt 1)"] * 20
            assert len(lines) == 22


def test_an_attempt_that_wrote_nothing_has_an_empty_log_and_a_deleted_task_none(
        suite, tenant, cassandra):
    tenant_id, api_key = tenant
    with suite.client(api_key) as client:
        quiet = client.create_task("echo", b"hi")  # the demo echo writes nothing
        client.wait(quiet.task_id, timeout=60)
        empty = client.get_attempt_log(quiet.task_id, 1)
        assert empty.text == "" and not empty.HasField("create_time")
        assert list(client.list_attempt_logs(quiet.task_id)) == [empty]

        done = run(client, talking(client), say="soon gone")
        assert AttemptLogStore(cassandra).get(tenant_id, done.task_id, 1) is not None
        client.delete_task(done.task_id)
        with pytest.raises(errors.NotFound):
            client.get_attempt_log(done.task_id, 1)
    assert AttemptLogStore(cassandra).get(tenant_id, done.task_id, 1) is None


def test_grpcurl_reads_an_attempt_log_as_text(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        done = run(client, talking(client), say="for grpcurl")
    result = grpcurl("-H", f"authorization: Bearer {api_key}", "-d",
                     json.dumps({"task_id": done.task_id, "attempt_number": 1}),
                     suite.address("gateway"), "weir.v1.TaskService/GetAttemptLog")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["text"].startswith("for grpcurl (attempt 1)\n")
    assert reply["attempt_number"] == 1 and "create_time" in reply and "expire_time" in reply
