"""The demo functions `make run` registers: echo, sleep and fail."""

import logging
import time

from libs import sdk

log = logging.getLogger(__name__)


@sdk.task
def echo(payload: bytes) -> bytes:
    """Returns its payload."""
    return payload


@sdk.task
def sleep(payload: bytes) -> bytes:
    """Sleeps the milliseconds written in its payload (e.g. b"250"), then returns it; says so
    in its attempt's log."""
    milliseconds = int(payload or b"0")
    log.info("sleeping %d ms", milliseconds)
    time.sleep(milliseconds / 1000)
    print(f"slept {milliseconds} ms")
    return payload


@sdk.task
def fail(payload: bytes) -> bytes:
    """Always fails, with its payload as the message."""
    raise sdk.NonRetryableError(payload.decode(errors="replace") or "demo failure")
