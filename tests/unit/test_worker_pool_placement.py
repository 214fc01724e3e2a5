"""Where the worker pool sends an attempt, and how it turns what happened into results."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2
from weir.v1 import common_pb2, tasks_pb2
from weir.worker.v1 import worker_pb2

from services.executor_manager.pool import (
    AttemptSpec,
    Held,
    Link,
    LinkState,
    WorkerProcess,
    WorkerSandbox,
    least_busy,
    outcome_of,
    place,
    stopped_result,
)

Exit = tasks_pb2.ExitReason
ErrorClass = common_pb2.ErrorClass
SANDBOX = WorkerSandbox(handler_packages="examples", memory_mb=1, cpu_seconds=1, open_files=1,
                        max_processes=1, user="nobody")


def links(count: int) -> list[Link]:
    return [Link(WorkerProcess(index=i, socket_dir=Path("/nonexistent"), sandbox=SANDBOX))
            for i in range(count)]


def held(number: int, *, function: str = "f", concurrency: int = 8,
         timeout: float = 60, priority: int = common_pb2.Priority.PRIORITY_NORMAL) -> Held:
    return Held(AttemptSpec(attempt_id=f"a{number}", tenant_id="t", task_id=f"task{number}",
                            function=function, handler="examples.demo:echo", payload=b"",
                            attempt_number=1, timeout=timedelta(seconds=timeout),
                            concurrency=concurrency, priority=priority))


def queue_of(*attempts: Held) -> collections.deque[Held]:
    return collections.deque(attempts)


def ids(batch: list[Held]) -> list[str]:
    return [h.spec.attempt_id for h in batch]


def test_attempts_are_spread_to_the_least_busy_workers_first():
    workers = links(3)
    place(queue_of(held(0)), workers, slots=4, now=0)  # the first worker is busier now
    batches = place(queue_of(*(held(i) for i in range(1, 6))), workers, slots=4, now=0)
    assert [len(w.held) for w in workers] == [2, 2, 2]
    # The idle ones first, then round the equals in order.
    assert ids(batches[workers[1]]) == ["a1", "a4"]
    assert ids(batches[workers[2]]) == ["a2", "a5"]
    assert ids(batches[workers[0]]) == ["a3"]


def test_no_worker_takes_more_than_its_slots_and_the_rest_wait_in_order():
    workers = links(2)
    waiting = queue_of(*(held(i) for i in range(7)))
    place(waiting, workers, slots=3, now=0)
    assert [len(w.held) for w in workers] == [3, 3]
    assert ids(list(waiting)) == ["a6"]


def test_a_worker_running_its_functions_concurrency_takes_no_more_of_it():
    workers = links(2)
    waiting = queue_of(*(held(i, function="limited", concurrency=1) for i in range(3)))
    place(waiting, workers, slots=4, now=0)
    assert [w.per_function for w in workers] == [{("t", "limited"): 1}] * 2
    assert ids(list(waiting)) == ["a2"]


def test_an_attempt_held_back_by_its_function_lets_later_ones_pass_and_keeps_its_place():
    workers = links(1)
    place(queue_of(held(0, function="limited", concurrency=1)), workers, slots=4, now=0)
    waiting = queue_of(held(1, function="limited", concurrency=1), held(2),
                       held(3, function="limited", concurrency=1), held(4))
    batches = place(waiting, workers, slots=4, now=0)
    assert ids(batches[workers[0]]) == ["a2", "a4"]
    assert ids(list(waiting)) == ["a1", "a3"]


def test_least_busy_skips_workers_at_the_functions_concurrency():
    first, second = links(2)
    first.per_function[("t", "f")] = 2
    assert least_busy([first, second], ("t", "f"), 2) is second
    second.per_function[("t", "f")] = 2
    assert least_busy([first, second], ("t", "f"), 2) is None
    assert least_busy([first, second], ("t", "f"), 3) is first  # the first of equals


def test_only_live_workers_take_attempts():
    retiring, stopping, gone, live = links(4)
    retiring.state, stopping.state, gone.state = (LinkState.RETIRING, LinkState.STOPPING,
                                                  LinkState.GONE)
    batches = place(queue_of(held(0), held(1)), [retiring, None, stopping, gone, live],
                    slots=4, now=0)
    assert list(batches) == [live]


def test_a_placed_attempts_deadline_counts_from_its_placing():
    workers = links(1)
    attempt = held(0, timeout=2.5)
    place(queue_of(attempt), workers, slots=1, now=100.0)
    assert attempt.deadline == 102.5
    assert attempt.link is workers[0]


def update(**fields: Any) -> worker_pb2.AttemptUpdate:
    message = worker_pb2.AttemptUpdate(attempt_id="a0", **fields)
    message.start_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC))
    message.end_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 6, 7000, tzinfo=UTC))
    return message


def test_a_returned_attempts_update_becomes_a_successful_result():
    start = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    result = outcome_of("a0", start, update(result=b"out"))
    assert result.succeeded and result.result == b"out"
    assert result.exit_reason == Exit.EXIT_REASON_RETURNED
    assert result.end_time == datetime(2026, 1, 2, 3, 4, 6, 7000, tzinfo=UTC)
    assert result.start_time == start


def test_a_raised_attempts_update_keeps_its_class_status_delay_and_traceback():
    error = worker_pb2.HandlerError(
        error_class=ErrorClass.ERROR_CLASS_THROTTLED,
        status=status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="busy"),
        retry_delay=duration_pb2.Duration(seconds=3), traceback="Traceback ...")
    result = outcome_of("a0", None, update(error=error))
    assert not result.succeeded
    assert (result.exit_reason, result.error_class) == (Exit.EXIT_REASON_RAISED,
                                                        ErrorClass.ERROR_CLASS_THROTTLED)
    assert (result.status.code, result.status.message) == (code_pb2.RESOURCE_EXHAUSTED, "busy")
    assert result.retry_delay == timedelta(seconds=3)
    assert result.traceback == "Traceback ..."


def test_an_unclassified_error_counts_as_retryable_without_a_requested_delay():
    result = outcome_of("a0", None, update(error=worker_pb2.HandlerError(
        status=status_pb2.Status(code=code_pb2.UNKNOWN, message="x"))))
    assert result.error_class == ErrorClass.ERROR_CLASS_RETRYABLE
    assert result.retry_delay is None


def test_an_attempt_the_pool_ended_gets_the_status_and_class_of_its_exit_reason():
    spec = held(0, timeout=1.5).spec
    now = datetime(2026, 1, 1, tzinfo=UTC)
    timed_out = stopped_result(spec, now, exit_reason=Exit.EXIT_REASON_TIMED_OUT, detail="",
                               now=now)
    assert (timed_out.status.code, timed_out.status.message) == (
        code_pb2.DEADLINE_EXCEEDED, "ran longer than the timeout of 1.5s")
    assert timed_out.error_class == ErrorClass.ERROR_CLASS_RETRYABLE
    cancelled = stopped_result(spec, None, exit_reason=Exit.EXIT_REASON_CANCELLED,
                               detail="cancelled", now=now)
    assert cancelled.status.code == code_pb2.CANCELLED
    assert cancelled.error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE
    crashed = stopped_result(spec, now, exit_reason=Exit.EXIT_REASON_WORKER_CRASHED,
                             detail="the worker process died", now=now)
    assert (crashed.status.code, crashed.status.message) == (code_pb2.UNAVAILABLE,
                                                             "the worker process died")
    assert crashed.error_class == ErrorClass.ERROR_CLASS_RETRYABLE
    assert crashed.end_time == now


HIGH, LOW = common_pb2.Priority.PRIORITY_HIGH, common_pb2.Priority.PRIORITY_LOW


def test_high_is_placed_first_and_lower_tiers_never_take_the_slots_kept_for_it():
    workers = links(2)
    waiting = queue_of(held(0, priority=LOW), held(1), held(2, priority=LOW), held(3),
                       held(4, priority=HIGH))
    batches = place(waiting, workers, slots=2, now=0, high_reserve=1)
    placed = [h.spec.attempt_id for batch in batches.values() for h in batch]
    # 4 slots, 1 kept: HIGH, then NORMAL in order, and the reserve is left free.
    assert sorted(placed) == ["a1", "a3", "a4"]
    assert [h.spec.attempt_id for h in waiting] == ["a0", "a2"]  # LOW waits, in order

    late_high = queue_of(*waiting, held(5, priority=HIGH))
    batches = place(late_high, workers, slots=2, now=0, high_reserve=1)
    assert [ids(b) for b in batches.values()] == [["a5"]]  # it takes the kept slot at once
    assert [h.spec.attempt_id for h in late_high] == ["a0", "a2"]


def test_without_a_reserve_every_slot_is_used_and_tiers_still_go_in_order():
    workers = links(1)
    waiting = queue_of(held(0, priority=LOW), held(1), held(2, priority=HIGH))
    batches = place(waiting, workers, slots=3, now=0)
    assert ids(batches[workers[0]]) == ["a2", "a1", "a0"] and not waiting
