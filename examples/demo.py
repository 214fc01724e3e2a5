"""The demo functions `make run` registers: echo, sleep and fail."""

import time

from libs import sdk


@sdk.task
def echo(payload: bytes) -> bytes:
    """Returns its payload."""
    return payload


@sdk.task
def sleep(payload: bytes) -> bytes:
    """Sleeps the milliseconds written in its payload (e.g. b"250"), then returns it."""
    time.sleep(int(payload or b"0") / 1000)
    return payload


@sdk.task
def fail(payload: bytes) -> bytes:
    """Always fails, with its payload as the message."""
    raise sdk.NonRetryableError(payload.decode(errors="replace") or "demo failure")
