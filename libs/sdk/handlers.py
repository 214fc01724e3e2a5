"""The handler side: a handler is a plain function of the payload, marked with `task`."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
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
    # W3C trace context (traceparent) of the attempt at its executor: spans a handler makes
    # as its children join the task's trace.
    trace_context: Mapping[str, str] = field(default_factory=dict)


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

    Register it as a function whose handler is ``"<module>:<name>"``; the module must be in
    one of the packages of the ``handler_packages`` setting (operator-deployed code), and only
    functions marked here are ever run. Raise
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


# ``package.module:function`` in ASCII identifiers only: Python would NFKC-normalise other
# letters in source code but not in import_module/getattr, so look-alikes could slip past the
# package check.
REFERENCE = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_]\w*)",
                       re.ASCII)


class HandlerRefused(LookupError):
    """A handler reference that may not be run: malformed, outside the allowed packages, not
    importable, or not a function marked with `task`."""


def handler_packages(setting: str) -> tuple[str, ...]:
    """The allowed packages of the ``handler_packages`` setting ("examples,tests.handlers")."""
    return tuple(p.strip() for p in setting.split(",") if p.strip())


def reference_problem(reference: str, allowed: Sequence[str]) -> str | None:
    """Checks a handler reference against the allowed packages without importing anything.

    Args:
        reference: a Function's handler, ``"package.module:function"``.
        allowed: packages whose modules may hold handlers, e.g. ``("examples",)``; a module
            is allowed when it is one of them or inside one (``examples.demo``, but not
            ``examples2``).

    Returns:
        What is wrong, for a human, or None when the reference may be imported.
    """
    match = REFERENCE.fullmatch(reference)
    if match is None:
        return (f"handler {reference!r} is not 'package.module:function' "
                "(ASCII identifiers, one colon)")
    module, name = match["module"], match["name"]
    if not any(module == package or module.startswith(package + ".") for package in allowed):
        return (f"handler {reference!r} is outside the allowed handler packages "
                f"({', '.join(allowed) or 'none configured'})")
    if name.startswith("_"):
        return f"handler {reference!r} names a private function"
    return None


def _resolve(reference: str, allowed: Sequence[str]) -> Handler:
    problem = reference_problem(reference, allowed)
    if problem is not None:
        raise HandlerRefused(problem)
    module_name, _, name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module's own code may raise anything while importing
        raise HandlerRefused(f"handler {reference!r}: cannot import {module_name!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
    try:
        fn = getattr(module, name)
    except Exception as exc:  # AttributeError, or anything a module __getattr__ raises
        raise HandlerRefused(f"handler {reference!r}: module {module_name!r} has no {name!r}"
                             ) from exc
    # `is True`, not truthiness: an object answering any attribute (a module __getattr__, a
    # proxy) must not pass for a marked function.
    if not callable(fn) or getattr(fn, "__weir_handler__", False) is not True:
        raise HandlerRefused(f"handler {reference!r} is not a function marked with @sdk.task")
    return fn


def handler_problem(reference: str, allowed: Sequence[str]) -> str | None:
    """Whether a handler reference may be registered and run, for the API to ask at
    CreateFunction/UpdateFunction time (the workers apply the same checks before a call).

    Checks the reference (`reference_problem`), then imports its module and requires a
    callable marked with `task`. Importing runs the module's top-level code, which is
    operator-deployed code in an allowed package by then.

    Args:
        reference: a Function's handler, ``"package.module:function"``.
        allowed: the allowed packages, e.g. ``handler_packages(config.handler_packages)``.

    Returns:
        What is wrong, for a human (e.g. "handler 'os:system' is outside the allowed handler
        packages (examples, tests.handlers)"), or None when the handler is fine.
    """
    try:
        _resolve(reference, allowed)
    except HandlerRefused as exc:
        return str(exc)
    return None


def load_handler(reference: str, allowed: Sequence[str]) -> Handler:
    """Imports the handler ``"package.module:function"`` once it passes `handler_problem`.

    Raises:
        HandlerRefused: saying why the reference may not be run.
    """
    return _resolve(reference, allowed)


def encode_result(value: Any) -> bytes:
    """A handler's return value as the task's result bytes."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"a handler returns bytes, str or None, not {type(value).__name__}")
