"""The public API against a hostile tenant: every row of the security review, end to end.

Each test is one thing an attacker with a tenant API key tried; what they got then is in the
test's docstring, what they get now in its assertions.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from weir.v1 import (
    common_pb2,
    functions_pb2,
    functions_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

from libs import errors
from libs.healthcheck import is_serving
from tests.helpers import eventually, unique

State = tasks_pb2.TaskState
OpState = operations_pb2.OperationState


def stub(suite, name: str = "gateway") -> tasks_pb2_grpc.TaskServiceStub:
    return tasks_pb2_grpc.TaskServiceStub(grpc.insecure_channel(suite.address(name)))


def auth(api_key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")]


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


# --- only deployed code runs ---------------------------------------------------------------

@pytest.mark.parametrize("handler", ["subprocess:getoutput", "os:system", "builtins:eval",
                                     "tests.handlers:unmarked", "examples.demo:echo\n"])
def test_a_function_may_not_name_code_the_operator_did_not_deploy(suite, tenant, handler):
    """Before: accepted, and a task with payload `id; hostname` SUCCEEDED as root."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client.create_function(unique("f").replace("_", "-"), handler)
        assert "function.handler" in raised.value.violations
        name = unique("f").replace("_", "-")
        client.create_function(name, "examples.demo:echo")
        update = functions_pb2.UpdateFunctionRequest(
            function=functions_pb2.Function(name=name, handler=handler))
        update.update_mask.paths.append("handler")
        with pytest.raises(errors.InvalidArgument):
            client._call(client._functions.UpdateFunction, update)
        assert client.get_function(name).handler == "examples.demo:echo"


# --- every request's work is bounded -------------------------------------------------------

def test_watch_streams_are_capped_per_tenant_and_hold_no_thread_others_need(
        suite, tenant, tenant_factory):
    """Before: 32 watches of a task scheduled weeks ahead timed out another tenant's GetTask
    and the gateway's health check."""
    _, api_key = tenant
    _, other_key = tenant_factory()
    gateway = stub(suite)
    with suite.client(api_key) as client, suite.client(other_key) as other:
        later = client.create_task("echo", b"x", delay=timedelta(days=14))
        mine = other.create_task("echo", b"y")
        request = tasks_pb2.WatchTaskRequest(task_id=later.task_id)
        streams = [gateway.WatchTask(request, metadata=auth(api_key), timeout=120)
                   for _ in range(suite.config.max_streams_per_tenant)]
        try:
            for watch in streams:  # each is open: it has sent the first stage
                assert next(watch).stage.state == State.TASK_STATE_ACCEPTED
            refused = failure(lambda: next(gateway.WatchTask(
                request, metadata=auth(api_key), timeout=10)))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = rpc_status.from_call(refused).details
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
            assert any(d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in details)
            began = time.monotonic()
            for _ in range(20):
                assert other.get_task(mine.task_id).task_id == mine.task_id
                assert is_serving(suite.address("gateway"), timeout_seconds=2)
            assert time.monotonic() - began < 10
            # Another tenant still watches.
            assert other.wait(mine.task_id, timeout=30).state == State.TASK_STATE_SUCCEEDED
        finally:
            for watch in streams:
                watch.cancel()
        # Closed streams give their places back.
        eventually(lambda: next(gateway.WatchTask(request, metadata=auth(api_key),
                                                  timeout=10)).stage.state
                   == State.TASK_STATE_ACCEPTED, timeout=10)


def test_operation_waits_are_capped_with_the_streams_and_hold_no_thread(
        suite, tenant, tenant_factory):
    """Before: each WaitOperation held one of the gateway's threads for up to a minute, and
    nothing capped how many a tenant held."""
    _, api_key = tenant
    _, other_key = tenant_factory()
    operations = operations_pb2_grpc.OperationServiceStub(
        grpc.insecure_channel(suite.address("gateway")))
    with suite.client(api_key) as client, suite.client(other_key) as other:
        # A re-drive paced at one a second through 200 IDs: it runs for minutes.
        slow = client.redrive_dead_letters([f"absent-{i}" for i in range(200)], per_second=1)
        mine = other.create_task("echo", b"y")

        def wait(seconds: float) -> operations_pb2.WaitOperationRequest:
            return operations_pb2.WaitOperationRequest(
                name=slow.name, timeout=duration_pb2.Duration(nanos=int(seconds * 1e9))
                if seconds < 1 else duration_pb2.Duration(seconds=int(seconds)))

        waits = [operations.WaitOperation.future(wait(50), metadata=auth(api_key), timeout=55)
                 for _ in range(suite.config.max_streams_per_tenant)]
        try:
            def one_more_is_refused() -> bool:
                try:
                    operations.WaitOperation(wait(0.01), metadata=auth(api_key), timeout=10)
                except grpc.RpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
                    return True
                return False  # not all the waits have reached the gateway yet

            eventually(one_more_is_refused, timeout=20, message="the 17th wait is refused")
            began = time.monotonic()
            for _ in range(20):
                assert other.get_task(mine.task_id).task_id == mine.task_id
                assert is_serving(suite.address("gateway"), timeout_seconds=2)
            assert time.monotonic() - began < 10
            assert not any(w.done() for w in waits)  # still waiting, on no thread
        finally:
            for w in waits:
                w.cancel()
            client.cancel_operation(slow.name)
        # Cancelled waits give their places back.
        eventually(lambda: operations.WaitOperation(wait(0.01), metadata=auth(api_key),
                                                    timeout=10).name == slow.name, timeout=10)


def test_a_forged_or_foreign_page_token_is_refused_at_once(suite, tenant, tenant_factory):
    """Before: a token whose day lay N days ahead cost one query per day (year 9999: about
    35 minutes), going on after the caller gave up."""
    _, api_key = tenant
    _, other_key = tenant_factory()
    with suite.client(api_key) as client, suite.client(other_key) as other:
        client.create_tasks([{"function": "echo"}] * 3)
        page = client._call(client._tasks.ListTasks, tasks_pb2.ListTasksRequest(page_size=1))
        token = page.next_page_token
        assert token
        body, mac = token.split(".")
        position = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        position["p"]["day"] = "9999-12-31"
        forged_body = base64.urlsafe_b64encode(json.dumps(position).encode()).decode()
        forged = [f"{forged_body.rstrip('=')}.{mac}", "%%%not-a-token", "a.b", token + "x",
                  "x" * 5000]
        for bad in forged:
            began = time.monotonic()
            with pytest.raises(errors.InvalidArgument) as raised:
                client._call(client._tasks.ListTasks,
                             tasks_pb2.ListTasksRequest(page_size=1, page_token=bad))
            assert "page_token" in raised.value.violations
            assert time.monotonic() - began < 2
        with pytest.raises(errors.InvalidArgument):  # another tenant's token
            other._call(other._tasks.ListTasks,
                        tasks_pb2.ListTasksRequest(page_size=1, page_token=token))
        with pytest.raises(errors.InvalidArgument):  # the token of another filter
            client._call(client._tasks.ListTasks, tasks_pb2.ListTasksRequest(
                page_size=1, page_token=token, filter='function = "echo"'))
        following = client._call(client._tasks.ListTasks,
                                 tasks_pb2.ListTasksRequest(page_size=1, page_token=token))
        assert len(following.tasks) == 1 and following.tasks[0] != page.tasks[0]


def test_a_hostile_filter_is_refused_in_linear_time_and_quotes_may_hold_and(suite, tenant):
    """Before: `"a" + 40,000 spaces + "a"` held the GIL for 2.4 s (quadratic split)."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        for hostile in ["a" + " " * 40_000 + "a", "a" + " " * 4000 + "a",
                        'function = "x"' + " AND" * 1000]:
            began = time.monotonic()
            with pytest.raises(errors.InvalidArgument) as raised:
                list(client.list_tasks(hostile))
            assert time.monotonic() - began < 2
            assert len(str(raised.value)) < 500
        client.create_task("echo", b"x", labels={"note": "salt AND pepper"})
        found = list(client.list_tasks('labels.note = "salt AND pepper"'))
        assert [t.labels["note"] for t in found] == ["salt AND pepper"]


def test_huge_ids_and_filters_get_a_small_invalid_argument(suite, tenant):
    """Before: a 12 KB task_id or 20 KB filter was echoed into the error, which then broke
    the transport ("metadata size exceeds hard limit")."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        for call in (lambda: client.get_task("t" * 12_000),
                     lambda: client.cancel_task("t" * 12_000),
                     lambda: list(client.list_tasks("f" * 20_000)),
                     lambda: client.get_dead_letter("t" * 70_000),
                     lambda: client.get_operation("op-" * 30_000)):
            with pytest.raises(errors.InvalidArgument) as raised:
                call()
            assert len(str(raised.value)) + sum(map(len, raised.value.violations.values())) < 600


# --- webhooks and result targets -----------------------------------------------------------

def test_a_gateway_refuses_webhooks_into_private_networks_unless_allowed(suite, tenant):
    """Before: the notifier POSTed signed outcomes to http://127.0.0.1:<port>/internal-admin."""
    _, api_key = tenant
    suite.launch("gateway_strict", module="gateway", WEIR_WEBHOOK_ALLOW_PRIVATE="false")
    suite.wait_serving("gateway_strict")
    try:
        strict = stub(suite, "gateway_strict")
        for url in ("http://127.0.0.1:9042/internal-admin", "http://[::1]/",
                    "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/",
                    "http://localhost:8080/"):
            task = tasks_pb2.Task(function="echo", result_targets=[common_pb2.ResultTarget(
                webhook=common_pb2.WebhookTarget(url=url))])
            error = failure(lambda t=task: strict.CreateTask(
                tasks_pb2.CreateTaskRequest(task=t), metadata=auth(api_key), timeout=10))
            typed = errors.from_rpc_error(error)
            assert isinstance(typed, errors.InvalidArgument), url
            assert "task.result_targets[0].webhook.url" in typed.violations
    finally:
        suite.terminate("gateway_strict")


# --- an honest contract --------------------------------------------------------------------

def test_task_ids_request_ids_and_operation_ids_do_not_collide(suite, tenant):
    """Before: a task named `request:X` answered a later CreateTask with request_id X, and a
    task named `operation:Y` made an operation with request_id Y answer NOT_FOUND."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        squatter = client.create_task("echo", b"squat", task_id="request:X")
        mine = client.create_task("echo", b"mine", request_id="X")
        assert mine.task_id != squatter.task_id
        assert client.create_task("echo", b"again", request_id="X").task_id == mine.task_id
        client.create_task("echo", b"squat", task_id="operation:Y")
        operation = client.batch_cancel_tasks('function = "sleep"', request_id="Y")
        assert client.get_operation(operation.name).name == operation.name
        assert client.batch_cancel_tasks('function = "sleep"',
                                         request_id="Y").name == operation.name


def timestamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize("fields, field", [
    ({"schedule_time": timestamp(2**62)}, "task.schedule_time"),
    ({"schedule_time": timestamp(0, -5)}, "task.schedule_time"),
    ({"expire_time": timestamp(-2**62)}, "task.expire_time"),
    ({"max_age": duration_pb2.Duration(seconds=2**62)}, "task.max_age"),
    ({"max_age": duration_pb2.Duration(seconds=5, nanos=-3)}, "task.max_age"),
    ({"retry_config": common_pb2.RetryConfig(
        min_backoff=duration_pb2.Duration(seconds=-2**62))}, "task.retry_config.min_backoff"),
    ({"retry_config": common_pb2.RetryConfig(max_attempts=-1)},
     "task.retry_config.max_retry_duration"),
    ({"function": "echo\n"}, "task.function"),
    ({"task_id": "t\n"}, "task.task_id"),
    ({"labels": {"k\n": "v"}}, "task.labels['k\\n']"),
])
def test_out_of_range_and_trailing_newline_input_is_invalid_argument_naming_the_field(
        suite, tenant, fields, field):
    """Before: 17 distinct INTERNAL answers with tracebacks; names ending in a newline were
    accepted (the patterns used `$`); -1 attempts retried forever."""
    _, api_key = tenant
    task = tasks_pb2.Task(function="echo")
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(task, name).update(value)
        elif hasattr(value, "CopyFrom"):
            getattr(task, name).CopyFrom(value)
        else:
            setattr(task, name, value)
    error = failure(lambda: stub(suite).CreateTask(tasks_pb2.CreateTaskRequest(task=task),
                                                   metadata=auth(api_key), timeout=10))
    typed = errors.from_rpc_error(error)
    assert isinstance(typed, errors.InvalidArgument), error
    assert field in typed.violations


def test_two_authorization_headers_are_refused(suite, tenant):
    """Before: the first header won."""
    _, api_key = tenant
    error = failure(lambda: stub(suite).GetTask(
        tasks_pb2.GetTaskRequest(task_id="t"), timeout=10,
        metadata=[("authorization", f"Bearer {api_key}"), ("authorization", "Bearer other")]))
    typed = errors.from_rpc_error(error)
    assert isinstance(typed, errors.Unauthenticated) and typed.reason == "API_KEY_AMBIGUOUS"


def test_nan_or_negative_limits_unlimited_retries_and_unknown_views_are_refused(suite, tenant):
    _, api_key = tenant
    functions = functions_pb2_grpc.FunctionServiceStub(
        grpc.insecure_channel(suite.address("gateway")))
    bad_functions = [
        functions_pb2.Function(rate_limits=common_pb2.RateLimits(
            max_dispatches_per_second=float("nan"))),
        functions_pb2.Function(rate_limits=common_pb2.RateLimits(max_concurrent_dispatches=-1)),
        functions_pb2.Function(retry_config=common_pb2.RetryConfig(max_attempts=-1)),
    ]
    for function in bad_functions:
        function.name, function.handler = unique("f").replace("_", "-"), "examples.demo:echo"
        error = failure(lambda f=function: functions.CreateFunction(
            functions_pb2.CreateFunctionRequest(function=f), metadata=auth(api_key), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = failure(lambda: stub(suite).GetTask(
        tasks_pb2.GetTaskRequest(task_id="t", view=999), metadata=auth(api_key), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_function_with_unfinished_tasks_is_deleted_only_with_force_which_cancels_them(
        suite, tenant):
    """Before: DeleteFunction returned OK and stranded the tasks, ignoring `force`."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        name = unique("f").replace("_", "-")
        client.create_function(name, "examples.demo:echo")
        waiting = client.create_task(name, b"x", delay=timedelta(days=1))
        with pytest.raises(errors.FailedPrecondition) as raised:
            client.delete_function(name)
        assert raised.value.metadata["task_id"] == waiting.task_id
        operation = client.delete_function(name, force=True)
        with pytest.raises(errors.FailedPrecondition):  # deleting: no new tasks
            client.create_task(name, b"late")
        done = client.wait_operation(operation.name, timeout=60)
        assert done.state == OpState.OPERATION_STATE_SUCCEEDED, done
        assert client.get_task(waiting.task_id).state == State.TASK_STATE_CANCELLED
        with pytest.raises(errors.NotFound):
            client.get_function(name)
        # Nothing unfinished: deleted at once, the operation already done.
        quiet = unique("f").replace("_", "-")
        client.create_function(quiet, "examples.demo:echo")
        finished = client.wait(client.create_task(quiet, b"x").task_id, timeout=60)
        assert finished.state == State.TASK_STATE_SUCCEEDED
        immediate = client.delete_function(quiet)
        assert immediate.state == OpState.OPERATION_STATE_SUCCEEDED
        assert client.get_operation(immediate.name).state == OpState.OPERATION_STATE_SUCCEEDED
        with pytest.raises(errors.NotFound):
            client.get_function(quiet)
