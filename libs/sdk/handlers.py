"""The handler side: a handler is a plain function of the payload, marked with `task`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

Handler = Callable[[bytes], Any]


def task(fn: Handler) -> Handler:
    """Marks a plain function ``fn(payload: bytes) -> bytes | str | None`` as a Weir handler.

    Register it as a function whose handler is ``"<module>:<name>"``. Raise
    `NonRetryableError`, `RetryableError` or `ThrottledError` to choose how a failure is
    retried; any other exception counts as retryable.
    """
    fn.__weir_handler__ = True  # type: ignore[attr-defined]
    return fn


class HandlerError(Exception):
    """Base of the errors a handler raises to classify its failure."""

    error_class = "RETRYABLE"

    def __init__(self, message: str, *, retry_after: timedelta | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NonRetryableError(HandlerError):
    """Retrying cannot help (bad input, no permission): the task fails at once."""

    error_class = "NON_RETRYABLE"


class RetryableError(HandlerError):
    """A transient failure: retried with backoff, or after ``retry_after`` when given."""

    error_class = "RETRYABLE"


class ThrottledError(HandlerError):
    """The handler or a downstream system is too busy: retried with the longer backoff."""

    error_class = "THROTTLED"


def load_handler(reference: str) -> Handler:
    """Imports ``"package.module:function"``."""
    module_name, _, name = reference.partition(":")
    if not module_name or not name:
        raise ValueError(f"handler {reference!r} is not 'package.module:function'")
    return getattr(importlib.import_module(module_name), name)


def encode_result(value: Any) -> bytes:
    """A handler's return value as the task's result bytes."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"a handler returns bytes, str or None, not {type(value).__name__}")
