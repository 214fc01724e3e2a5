"""A function's effective values: what its unset fields mean, as the system applies them."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf import duration_pb2
from weir.v1 import common_pb2, functions_pb2

from libs.function_defaults import effective
from libs.retry import RetryPolicy


def test_unset_fields_show_the_defaults_the_gateway_and_dispatchers_apply():
    shown = effective(functions_pb2.Function(name="f", handler="examples.demo:echo"))
    assert shown.timeout.ToTimedelta() == timedelta(seconds=60)
    assert shown.default_priority == common_pb2.Priority.PRIORITY_NORMAL
    assert shown.dedup_window.ToTimedelta() == timedelta(hours=24)
    assert shown.worker_concurrency == 1
    retry = shown.retry_config
    assert (retry.max_attempts, retry.max_doublings) == (3, 16)
    assert retry.min_backoff.ToTimedelta() == timedelta(seconds=1)
    assert retry.max_backoff.ToTimedelta() == timedelta(hours=1)
    assert retry.throttled_min_backoff.ToTimedelta() == timedelta(seconds=10)
    assert not retry.HasField("max_retry_duration")  # no time limit
    assert RetryPolicy.of(shown.retry_config) == RetryPolicy.of()


def test_set_fields_are_kept_and_the_stored_function_is_untouched():
    given = functions_pb2.Function(
        name="f", handler="examples.demo:echo", timeout=duration_pb2.Duration(seconds=5),
        default_priority=common_pb2.Priority.PRIORITY_HIGH, worker_concurrency=4,
        retry_config=common_pb2.RetryConfig(max_attempts=-1, max_retry_duration=duration_pb2
                                            .Duration(seconds=600)))
    shown = effective(given)
    assert shown.timeout.seconds == 5 and shown.worker_concurrency == 4
    assert shown.default_priority == common_pb2.Priority.PRIORITY_HIGH
    assert shown.retry_config.max_attempts == -1
    assert shown.retry_config.max_retry_duration.seconds == 600
    assert shown.retry_config.min_backoff.seconds == 1
    assert not given.retry_config.HasField("min_backoff")
