"""Handlers the task-semantics tests register (workers import them as ``tests.handlers:…``)."""

from __future__ import annotations

import json
from datetime import timedelta

from libs import sdk

ERRORS = {"RETRYABLE": sdk.RetryableError, "THROTTLED": sdk.ThrottledError,
          "NON_RETRYABLE": sdk.NonRetryableError}


@sdk.task
def flaky(payload: bytes) -> bytes:
    """Fails until attempt ``succeed_on``, with the error class ``error`` and, if given,
    asking for a retry after ``retry_after`` seconds. Payload: JSON of those keys."""
    spec = json.loads(payload)
    attempt = sdk.current_attempt().attempt_number
    if attempt < spec["succeed_on"]:
        retry_after = spec.get("retry_after")
        raise ERRORS[spec.get("error", "RETRYABLE")](
            f"attempt {attempt} fails on purpose",
            retry_after=timedelta(seconds=retry_after) if retry_after else None)
    return f"succeeded on attempt {attempt}".encode()


@sdk.task
def strict(payload: bytes) -> bytes:
    """Accepts only the payload ``good``; anything else is a non-retryable bad input."""
    if payload != b"good":
        raise sdk.NonRetryableError(f"bad input {payload!r}")
    return b"accepted"
