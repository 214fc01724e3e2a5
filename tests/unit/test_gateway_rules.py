"""Pure rules of the gateway: request validation and the list filters."""

import math
from datetime import UTC, datetime

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs.cassandra.dead_letters import DeadLetterRow
from libs.errors import InvalidArgument
from services.gateway import validation
from services.gateway.filters import DeadLetterFilter, TaskFilter


def create(**task) -> tasks_pb2.CreateTaskRequest:
    return tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(**task))


def violations(request: tasks_pb2.CreateTaskRequest, *, prefix: str = "",
               max_payload_bytes: int = 10) -> dict[str, str]:
    return validation.task_violations(request, prefix=prefix,
                                      max_payload_bytes=max_payload_bytes,
                                      allow_private_targets=False)


def function_violations(**fields) -> dict[str, str]:
    return validation.function_violations(
        functions_pb2.Function(**fields), handler_packages=("examples", "tests.handlers"),
        allow_private_targets=False)


def test_every_problem_of_a_request_is_reported_at_once_by_field_path():
    problems = violations(create(function="", task_id="bad id", payload=b"xx", priority=9),
                          prefix="requests[2].", max_payload_bytes=1)
    assert set(problems) == {"requests[2].task.function", "requests[2].task.task_id",
                             "requests[2].task.payload", "requests[2].task.priority"}


def test_a_valid_request_has_no_violations():
    assert violations(create(function="echo", task_id="order-1:a.b_c")) == {}


def test_a_batch_must_hold_one_to_a_thousand_requests():
    with pytest.raises(InvalidArgument):
        validation.check_batch(tasks_pb2.BatchCreateTasksRequest(), max_payload_bytes=10,
                               allow_private_targets=False)
    too_many = tasks_pb2.BatchCreateTasksRequest(requests=[create(function="echo")] * 1001)
    with pytest.raises(InvalidArgument) as raised:
        validation.check_batch(too_many, max_payload_bytes=10, allow_private_targets=False)
    assert "requests" in raised.value.violations


def test_a_function_needs_a_name_and_an_allowed_marked_handler():
    assert set(function_violations(name="9x", handler="nope")) == {"function.name",
                                                                  "function.handler"}
    assert function_violations(name="resize", handler="examples.demo:echo") == {}


@pytest.mark.parametrize("handler", [
    "subprocess:getoutput", "os:system", "builtins:eval", "examples2.demo:echo",
    "examples.demo:echo\n", "examples.demo:_private", "examples.demo:time",
    "tests.handlers:unmarked", "x" * 300])
def test_only_marked_handlers_of_allowed_packages_may_be_registered(handler):
    assert "function.handler" in function_violations(name="f", handler=handler)


@pytest.mark.parametrize("value", ["echo\n", "Echo", "e" * 64, "echo x"])
def test_names_must_match_whole_without_a_trailing_newline(value):
    assert "function.name" in function_violations(name=value, handler="examples.demo:echo")
    assert "task.function" in violations(create(function=value))


@pytest.mark.parametrize("task_id", ["t\n", "t" * 129, "a/b", "é"])
def test_task_ids_must_match_whole(task_id):
    assert "task.task_id" in violations(create(function="echo", task_id=task_id))
    with pytest.raises(InvalidArgument) as raised:
        validation.check_id(task_id)
    assert len(str(raised.value)) < 200  # the input is quoted as an excerpt only


@pytest.mark.parametrize("field", ["schedule_time", "expire_time"])
@pytest.mark.parametrize("seconds, nanos", [(2**62, 0), (-2**62, 0), (0, -1),
                                            (0, 1_000_000_000), (253_402_300_800, 0)])
def test_out_of_range_timestamps_are_invalid_arguments_naming_the_field(field, seconds, nanos):
    request = create(function="echo")
    getattr(request.task, field).CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
    assert f"task.{field}" in violations(request)


@pytest.mark.parametrize("seconds, nanos", [(2**62, 0), (-1, 5), (1, -5),
                                            (0, 2_000_000_000), (315_576_000_001, 0)])
def test_out_of_range_durations_are_invalid_arguments_naming_the_field(seconds, nanos):
    request = create(function="echo")
    request.task.max_age.CopyFrom(Duration(seconds=seconds, nanos=nanos))
    request.task.retry_config.min_backoff.CopyFrom(Duration(seconds=seconds, nanos=nanos))
    problems = violations(request)
    assert {"task.max_age", "task.retry_config.min_backoff"} <= set(problems)
    assert set(function_violations(
        name="f", handler="examples.demo:echo", timeout=Duration(seconds=seconds, nanos=nanos),
        dedup_window=Duration(seconds=seconds, nanos=nanos))) == {"function.timeout",
                                                                   "function.dedup_window"}


@pytest.mark.parametrize("rate", [math.nan, math.inf, -1.0, 1e12])
def test_rate_limits_are_finite_and_bounded(rate):
    limits = common_pb2.RateLimits(max_dispatches_per_second=rate, max_burst_size=-1,
                                   max_concurrent_dispatches=-5)
    assert set(function_violations(name="f", handler="examples.demo:echo",
                                   rate_limits=limits)) == {
        "function.rate_limits.max_dispatches_per_second", "function.rate_limits.max_burst_size",
        "function.rate_limits.max_concurrent_dispatches"}


@pytest.mark.parametrize("concurrency", [-1, 65, 2**31 - 1])
def test_worker_concurrency_is_between_0_and_64(concurrency):
    assert set(function_violations(name="f", handler="examples.demo:echo",
                                   worker_concurrency=concurrency)) == {
        "function.worker_concurrency"}
    assert function_violations(name="f", handler="examples.demo:echo",
                               worker_concurrency=64) == {}


def test_unlimited_retries_need_a_max_retry_duration():
    forever = common_pb2.RetryConfig(max_attempts=-1)
    assert "function.retry_config.max_retry_duration" in function_violations(
        name="f", handler="examples.demo:echo", retry_config=forever)
    bounded = common_pb2.RetryConfig(max_attempts=-1,
                                     max_retry_duration=Duration(seconds=3600))
    assert function_violations(name="f", handler="examples.demo:echo",
                               retry_config=bounded) == {}
    # A task's override is judged with its function's policy.
    assert validation.unlimited_without_end([common_pb2.RetryConfig(), forever])
    assert not validation.unlimited_without_end([bounded, forever])


@pytest.mark.parametrize("request_id, ok", [("a" * 128, True), ("a" * 129, False),
                                            ("r\n", False), ("has space", False),
                                            ("base64+/=", True)])
def test_request_ids_are_printable_and_capped(request_id, ok):
    problems = violations(tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function="echo"),
                                                      request_id=request_id))
    assert ("request_id" not in problems) == ok


def test_labels_have_capped_keys_and_values():
    assert "task.labels['a b']" in violations(create(function="echo", labels={"a b": "x"}))
    assert "task.labels['k']" in violations(create(function="echo", labels={"k": "v" * 257}))
    assert "task.labels" in violations(create(function="echo",
                                              labels={f"k{i}": "v" for i in range(33)}))


def test_unknown_views_are_invalid_arguments():
    with pytest.raises(InvalidArgument) as raised:
        validation.check_view(999)
    assert "view" in raised.value.violations


def task(**fields) -> tasks_pb2.Task:
    created = Timestamp()
    created.FromJsonString(fields.pop("created", "2026-11-24T12:00:00Z"))
    return tasks_pb2.Task(create_time=created, **fields)


def test_the_filter_combines_clauses_with_and():
    f = TaskFilter.parse('function = "resize" AND state = TASK_STATE_FAILED AND '
                         'create_time >= "2026-11-24T00:00:00Z" AND labels.customer = "acme"')
    match = task(function="resize", state=tasks_pb2.TaskState.TASK_STATE_FAILED,
                 labels={"customer": "acme"})
    assert f.matches(match)
    assert not f.matches(task(function="resize", state=tasks_pb2.TaskState.TASK_STATE_FAILED,
                              labels={"customer": "acme"}, created="2026-11-23T23:59:59Z"))
    assert not f.matches(task(function="other", state=tasks_pb2.TaskState.TASK_STATE_FAILED,
                              labels={"customer": "acme"}))


def test_an_empty_filter_matches_everything():
    assert TaskFilter.parse("  ").matches(task(function="x"))


@pytest.mark.parametrize("text", ['function > "a"', "state = NOPE", "colour = red",
                                  'create_time < "yesterday"', 'function = "a" OR 1=1'])
def test_a_filter_that_cannot_be_read_is_invalid_argument(text):
    with pytest.raises(InvalidArgument) as raised:
        TaskFilter.parse(text)
    assert "filter" in raised.value.violations


def test_the_dead_letter_filter_reads_listing_rows():
    row = DeadLetterRow(datetime(2026, 11, 25, 10, tzinfo=UTC), "t1", "resize",
                        common_pb2.ErrorClass.ERROR_CLASS_NON_RETRYABLE)
    f = DeadLetterFilter.parse('function = "resize" AND error_class = ERROR_CLASS_NON_RETRYABLE '
                               'AND dead_letter_time >= "2026-11-25T00:00:00Z"')
    assert f.matches(row)
    assert not DeadLetterFilter.parse("error_class = ERROR_CLASS_THROTTLED").matches(row)
    for bad in ("state = TASK_STATE_FAILED", "error_class = LOUD", "dead_letter_time > soon"):
        with pytest.raises(InvalidArgument):
            DeadLetterFilter.parse(bad)
