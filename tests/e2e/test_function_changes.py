"""A change to a function applies to every task submitted a second after the call returned,
whichever gateway took the change and whichever takes the task (functions.proto)."""

from __future__ import annotations

import time

import pytest
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import errors
from libs.sdk import Client
from tests.helpers import unique

BOUND_SECONDS = 1.0  # documented at FunctionService: what this test holds the services to
State = tasks_pb2.TaskState
HIGH = common_pb2.Priority.PRIORITY_HIGH


@pytest.fixture
def second_gateway(suite):
    """Another gateway, whose function cache the first gateway's changes do not touch."""
    suite.launch("gateway_second", module="gateway")
    suite.wait_serving("gateway_second")
    yield suite.address("gateway_second")
    suite.terminate("gateway_second")


def test_an_update_and_a_pause_apply_within_a_second_through_any_gateway(
        suite, tenant, second_gateway):
    """Before: the other gateway's cache kept the old function for 5 s, and a dispatcher that
    had been idle decided its next task on the function as it had been before the pause."""
    _, api_key = tenant
    name = unique("f").replace("_", "-")
    with suite.client(api_key) as first, \
            Client(second_gateway, api_key=api_key, timeout=30) as second:
        first.create_function(name, "examples.demo:echo")
        # Every cache on the path (the second gateway's, the dispatcher's) holds the function.
        warm = second.create_task(name, b"warm")
        assert second.wait(warm.task_id).state == State.TASK_STATE_SUCCEEDED

        first.update_function(functions_pb2.Function(name=name, default_priority=HIGH),
                              ["default_priority"])
        time.sleep(BOUND_SECONDS)  # the documented bound is the subject of the test
        assert second.create_task(name, b"after the update").priority == HIGH

        first.pause_function(name)
        time.sleep(BOUND_SECONDS)
        held = second.create_task(name, b"after the pause")
        seen = []
        with pytest.raises(errors.DeadlineExceeded):  # the watch outlives its window
            for change in second.watch(held.task_id, timeout=3):
                seen.append(change.stage.state)
        assert State.TASK_STATE_DISPATCHED not in seen and \
            second.get_task(held.task_id).state == State.TASK_STATE_QUEUED, seen

        first.resume_function(name)
        assert second.wait(held.task_id).state == State.TASK_STATE_SUCCEEDED
