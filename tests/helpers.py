"""Test helpers: polling with a deadline instead of sleeps, free ports, unique names."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1,
               message: str = "condition") -> T:
    """Calls ``check`` until it returns a truthy value (returned) or raises no AssertionError.

    Fails the test with the last error when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    """A name no other test uses: ``prefix_<12 hex>`` (valid as keyspace, topic, tenant)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class Clock:
    """A clock a test moves by hand (``clock.now += 1``); call it for the time."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
