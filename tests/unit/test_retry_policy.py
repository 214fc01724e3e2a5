"""The retry policy: merging configs, the documented backoff, and each decision."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2
from weir.v1 import common_pb2, tasks_pb2

from libs.retry import RetryPolicy, backoff, decide, violations

State = tasks_pb2.TaskState
ErrorClass = common_pb2.ErrorClass
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def d(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


def test_the_documented_example_of_retry_config():
    policy = RetryPolicy(min_backoff=timedelta(seconds=10), max_backoff=timedelta(seconds=300),
                         max_doublings=3)
    assert [backoff(policy, n).total_seconds() for n in range(1, 10)] == [
        10, 20, 40, 80, 160, 240, 300, 300, 300]


def test_throttled_failures_start_from_the_throttled_backoff():
    policy = RetryPolicy(min_backoff=timedelta(seconds=1),
                         throttled_min_backoff=timedelta(seconds=10))
    assert backoff(policy, 1, throttled=True) == timedelta(seconds=10)
    assert backoff(policy, 2, throttled=True) == timedelta(seconds=20)
    assert backoff(policy, 2) == timedelta(seconds=2)


def test_a_task_overrides_its_functions_policy_field_by_field():
    function = common_pb2.RetryConfig(max_attempts=7, min_backoff=d(2), max_backoff=d(60))
    task = common_pb2.RetryConfig(max_attempts=2)
    policy = RetryPolicy.of(function, task)
    assert policy.max_attempts == 2
    assert policy.min_backoff == timedelta(seconds=2)
    assert policy.max_backoff == timedelta(seconds=60)
    assert policy.max_doublings == 16  # the default, set by neither
    assert RetryPolicy.of() == RetryPolicy()


DEFAULT = RetryPolicy()


def decide_now(policy=DEFAULT, **kwargs):
    defaults = {"error_class": ErrorClass.ERROR_CLASS_RETRYABLE, "attempts": 1, "now": NOW,
                "first_attempt_time": NOW, "rng": random.Random(7)}
    return decide(policy, **{**defaults, **kwargs})


def test_a_non_retryable_failure_is_final_at_once():
    decision = decide_now(error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE)
    assert decision.state == State.TASK_STATE_FAILED


def test_retries_stop_at_max_attempts_and_unlimited_means_unlimited():
    assert decide_now(attempts=3).state == State.TASK_STATE_FAILED  # default 3
    assert decide_now(attempts=2).state == State.TASK_STATE_RETRY_WAIT
    unlimited = RetryPolicy(max_attempts=-1, max_backoff=timedelta(seconds=5))
    assert decide_now(unlimited, attempts=1000).state == State.TASK_STATE_RETRY_WAIT


def test_every_delay_is_jittered_within_twenty_percent_and_capped():
    policy = RetryPolicy(min_backoff=timedelta(seconds=10), max_backoff=timedelta(seconds=15))
    rng = random.Random(1)
    first = [decide_now(policy, attempts=1, rng=rng).delay.total_seconds() for _ in range(200)]
    assert min(first) >= 8 and max(first) <= 12 and len(set(first)) > 100
    capped = [decide_now(policy, attempts=2, rng=rng).delay.total_seconds() for _ in range(50)]
    assert max(capped) <= 15 and min(capped) >= 15 * 0.8


def test_a_requested_delay_replaces_the_backoff_but_not_the_cap():
    policy = RetryPolicy(max_backoff=timedelta(seconds=30))
    assert decide_now(policy, requested_delay=timedelta(seconds=7)).delay == timedelta(seconds=7)
    assert decide_now(policy, requested_delay=timedelta(hours=1)).delay == \
        timedelta(seconds=30)


def test_max_retry_duration_ends_retries_early():
    policy = RetryPolicy(max_attempts=-1, max_retry_duration=timedelta(minutes=1),
                         min_backoff=timedelta(seconds=10))
    started = NOW - timedelta(seconds=55)
    assert decide_now(policy, first_attempt_time=started).state == State.TASK_STATE_FAILED
    assert decide_now(policy, first_attempt_time=NOW).state == State.TASK_STATE_RETRY_WAIT


def test_a_retry_due_after_the_expiry_ends_the_task_expired():
    decision = decide_now(expire_time=NOW + timedelta(milliseconds=500))
    assert decision.state == State.TASK_STATE_EXPIRED


@pytest.mark.parametrize("config, field", [
    (common_pb2.RetryConfig(max_attempts=101), "rc.max_attempts"),
    (common_pb2.RetryConfig(max_attempts=-2), "rc.max_attempts"),
    (common_pb2.RetryConfig(max_doublings=31), "rc.max_doublings"),
    (common_pb2.RetryConfig(min_backoff=d(0.05)), "rc.min_backoff"),
    (common_pb2.RetryConfig(max_backoff=d(2 * 86400)), "rc.max_backoff"),
    (common_pb2.RetryConfig(min_backoff=d(10), max_backoff=d(5)), "rc.max_backoff"),
    (common_pb2.RetryConfig(throttled_min_backoff=d(0.5)), "rc.throttled_min_backoff"),
    (common_pb2.RetryConfig(max_retry_duration=d(31 * 86400)), "rc.max_retry_duration"),
])
def test_out_of_bounds_settings_are_named(config, field):
    assert field in violations(config, at="rc")


def test_valid_settings_pass():
    assert violations(common_pb2.RetryConfig(max_attempts=-1, min_backoff=d(0.1),
                                             max_backoff=d(3600), max_doublings=30),
                      at="rc") == {}
