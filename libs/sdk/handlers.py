"""The handler side: a handler is a plain function of the payload, marked with `task`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

Handler = Callable[[bytes], Any]


@dataclass(frozen=True)
class Attempt:
    """The attempt a handler is running, from `current_attempt()`."""

    tenant_id: str
    task_id: str
    function: str
    attempt_number: int  # 1 for the first attempt, then 2, 3, ...
    deadline: datetime | None  # when the function's timeout stops it


_current: ContextVar[Attempt | None] = ContextVar("weir_attempt", default=None)


@contextmanager
def running(attempt: Attempt | None) -> Iterator[None]:
    """Makes ``attempt`` the `current_attempt()` while a handler runs (the worker runtime)."""
    token = _current.set(attempt)
    try:
        yield
    finally:
        _current.reset(token)


def current_attempt() -> Attempt:
    """The attempt being run, inside a handler (e.g. to act differently on a retry)."""
    attempt = _current.get()
    if attempt is None:
        raise RuntimeError("current_attempt() is only available inside a running handler")
    return attempt


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
