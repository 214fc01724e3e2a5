"""Pure rules of the gateway: request validation and the list filters."""

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs.cassandra.dead_letters import DeadLetterRow
from libs.errors import InvalidArgument
from services.gateway import validation
from services.gateway.filters import DeadLetterFilter, TaskFilter


def create(**task) -> tasks_pb2.CreateTaskRequest:
    return tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(**task))


def test_every_problem_of_a_request_is_reported_at_once_by_field_path():
    problems = validation.task_violations(
        create(function="", task_id="bad id", payload=b"xx", priority=9),
        prefix="requests[2].", max_payload_bytes=1)
    assert set(problems) == {"requests[2].task.function", "requests[2].task.task_id",
                             "requests[2].task.payload", "requests[2].task.priority"}


def test_a_valid_request_has_no_violations():
    assert validation.task_violations(create(function="echo", task_id="order-1:a.b_c"),
                                      prefix="", max_payload_bytes=10) == {}


def test_a_batch_must_hold_one_to_a_thousand_requests():
    with pytest.raises(InvalidArgument):
        validation.check_batch(tasks_pb2.BatchCreateTasksRequest(), max_payload_bytes=10)
    too_many = tasks_pb2.BatchCreateTasksRequest(requests=[create(function="echo")] * 1001)
    with pytest.raises(InvalidArgument) as raised:
        validation.check_batch(too_many, max_payload_bytes=10)
    assert "requests" in raised.value.violations


def test_a_function_needs_a_name_and_a_python_handler_reference():
    problems = validation.function_violations(functions_pb2.Function(name="9x", handler="nope"))
    assert set(problems) == {"function.name", "function.handler"}
    assert validation.function_violations(
        functions_pb2.Function(name="resize", handler="app.tasks:resize")) == {}


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
