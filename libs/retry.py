"""Retry policy: whether a failed attempt is retried, and after how long. Pure functions.

The rules are the ones documented on weir.v1.RetryConfig: a function's policy, overridden
field by field by a task's; delays double from `min_backoff` up to `max_doublings` times, then
grow linearly, never beyond `max_backoff`, jittered by a factor in [0.8, 1.2].
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from weir.v1 import common_pb2, tasks_pb2

ErrorClass = common_pb2.ErrorClass
State = tasks_pb2.TaskState

DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 100
DEFAULT_MIN_BACKOFF = timedelta(seconds=1)
DEFAULT_MAX_BACKOFF = timedelta(hours=1)
DEFAULT_MAX_DOUBLINGS = 16
DEFAULT_THROTTLED_MIN_BACKOFF = timedelta(seconds=10)
JITTER = (0.8, 1.2)


@dataclass(frozen=True)
class RetryPolicy:
    """A complete policy: every field resolved to its value or default."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # -1: unlimited
    max_retry_duration: timedelta | None = None
    min_backoff: timedelta = DEFAULT_MIN_BACKOFF
    max_backoff: timedelta = DEFAULT_MAX_BACKOFF
    max_doublings: int = DEFAULT_MAX_DOUBLINGS
    throttled_min_backoff: timedelta = DEFAULT_THROTTLED_MIN_BACKOFF

    @classmethod
    def of(cls, *configs: common_pb2.RetryConfig) -> RetryPolicy:
        """The policy of the defaults overridden by each config in turn (function, then task);
        a field a config leaves unset keeps the value before it."""
        values: dict[str, object] = {}
        for config in configs:
            if config.max_attempts:
                values["max_attempts"] = config.max_attempts
            if config.max_doublings:
                values["max_doublings"] = config.max_doublings
            for name in ("max_retry_duration", "min_backoff", "max_backoff",
                         "throttled_min_backoff"):
                if config.HasField(name):
                    values[name] = getattr(config, name).ToTimedelta()
        return cls(**values)  # type: ignore[arg-type]


def backoff(policy: RetryPolicy, retry: int, *, throttled: bool = False) -> timedelta:
    """The delay before retry ``retry`` (1 for the first retry), before jitter.

    >>> p = RetryPolicy(min_backoff=timedelta(seconds=10), max_backoff=timedelta(seconds=300),
    ...                 max_doublings=3)
    >>> [int(backoff(p, n).total_seconds()) for n in range(1, 9)]
    [10, 20, 40, 80, 160, 240, 300, 300]
    """
    first = policy.throttled_min_backoff if throttled else policy.min_backoff
    doublings = retry - 1
    if doublings <= policy.max_doublings:
        delay = first * (2 ** doublings)
    else:
        delay = first * (2 ** policy.max_doublings) * (retry - policy.max_doublings)
    return min(delay, policy.max_backoff)


@dataclass(frozen=True)
class Decision:
    """What follows a failed attempt: RETRY_WAIT for ``delay``, or a final state."""

    state: tasks_pb2.TaskState
    delay: timedelta = timedelta(0)
    detail: str = ""


def decide(policy: RetryPolicy, *, error_class: int, attempts: int, now: datetime,
           first_attempt_time: datetime, requested_delay: timedelta | None = None,
           expire_time: datetime | None = None, rng: random.Random | None = None) -> Decision:
    """Decides the fate of a task whose attempt number ``attempts`` (counted since its last
    re-drive) just failed with ``error_class``.

    A handler's requested delay replaces the computed backoff (capped by `max_backoff`). A
    retry that could only start after the task's expiry ends it EXPIRED now.
    """
    if error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE:
        return Decision(State.TASK_STATE_FAILED, detail="non-retryable error")
    if policy.max_attempts != -1 and attempts >= policy.max_attempts:
        return Decision(State.TASK_STATE_FAILED,
                        detail=f"retries exhausted after {attempts} attempts")
    if requested_delay is not None:
        delay = min(requested_delay, policy.max_backoff)
    else:
        throttled = error_class == ErrorClass.ERROR_CLASS_THROTTLED
        computed = backoff(policy, attempts, throttled=throttled)
        delay = min(computed * (rng or random).uniform(*JITTER), policy.max_backoff)
    due = now + delay
    if policy.max_retry_duration and due - first_attempt_time > policy.max_retry_duration:
        return Decision(State.TASK_STATE_FAILED, detail=(
            f"retries exhausted: the next would start after max_retry_duration "
            f"({policy.max_retry_duration.total_seconds():g}s)"))
    if expire_time is not None and due >= expire_time:
        return Decision(State.TASK_STATE_EXPIRED,
                        detail="the next retry would start after the task's expire_time")
    return Decision(State.TASK_STATE_RETRY_WAIT, delay=delay,
                    detail=f"retry in {delay.total_seconds():.3f}s")


def violations(config: common_pb2.RetryConfig, *, at: str) -> dict[str, str]:
    """Problems of a RetryConfig against the documented bounds, keyed by field path."""
    problems: dict[str, str] = {}

    def bounded(name: str, low: timedelta, high: timedelta, rule: str) -> None:
        if config.HasField(name) and not low <= getattr(config, name).ToTimedelta() <= high:
            problems[f"{at}.{name}"] = rule

    if not (config.max_attempts == -1 or 0 <= config.max_attempts <= MAX_ATTEMPTS_LIMIT):
        problems[f"{at}.max_attempts"] = "-1 (unlimited), 0 (default 3) or 1 to 100"
    if not 0 <= config.max_doublings <= 30:
        problems[f"{at}.max_doublings"] = "between 0 and 30"
    bounded("max_retry_duration", timedelta(0), timedelta(days=30), "between 0 and 30 days")
    bounded("min_backoff", timedelta(milliseconds=100), timedelta(hours=1),
            "between 100ms and 1h")
    bounded("max_backoff", timedelta(milliseconds=100), timedelta(hours=24),
            "between 100ms and 24h")
    bounded("throttled_min_backoff", timedelta(seconds=1), timedelta(hours=1),
            "between 1s and 1h")
    if (config.HasField("min_backoff") and config.HasField("max_backoff")
            and config.max_backoff.ToTimedelta() < config.min_backoff.ToTimedelta()):
        problems[f"{at}.max_backoff"] = "at least min_backoff"
    return problems
