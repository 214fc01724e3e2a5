"""What a function's unset fields mean: the values the gateway and the dispatchers apply.

Declared once here so that the code applying a default and `effective`, which shows it to
callers (GetFunction), cannot drift apart.
"""

from __future__ import annotations

from datetime import timedelta

from weir.v1 import common_pb2, functions_pb2

from libs.retry import RetryPolicy

DEFAULT_TIMEOUT = timedelta(seconds=60)
DEFAULT_PRIORITY = common_pb2.Priority.PRIORITY_NORMAL
DEFAULT_DEDUP_WINDOW = timedelta(hours=24)
DEFAULT_WORKER_CONCURRENCY = 1


def effective(function: functions_pb2.Function) -> functions_pb2.Function:
    """A copy of ``function`` with every defaulted field set to the value applied.

    ``retry_config.max_retry_duration`` stays unset when it is (no time limit), and rate
    limits stay as given (0 means no limit).
    """
    shown = functions_pb2.Function()
    shown.CopyFrom(function)
    if not shown.HasField("timeout"):
        shown.timeout.FromTimedelta(DEFAULT_TIMEOUT)
    if not shown.default_priority:
        shown.default_priority = DEFAULT_PRIORITY
    if not shown.HasField("dedup_window"):
        shown.dedup_window.FromTimedelta(DEFAULT_DEDUP_WINDOW)
    if not shown.worker_concurrency:
        shown.worker_concurrency = DEFAULT_WORKER_CONCURRENCY
    policy = RetryPolicy.of(function.retry_config)
    retry = shown.retry_config
    retry.max_attempts = policy.max_attempts
    retry.max_doublings = policy.max_doublings
    retry.min_backoff.FromTimedelta(policy.min_backoff)
    retry.max_backoff.FromTimedelta(policy.max_backoff)
    retry.throttled_min_backoff.FromTimedelta(policy.throttled_min_backoff)
    if policy.max_retry_duration:
        retry.max_retry_duration.FromTimedelta(policy.max_retry_duration)
    return shown
