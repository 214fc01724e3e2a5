"""Background work repeated at an interval (sweepers, heartbeats), stoppable at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

REPEAT_LOG_SECONDS = 10.0  # while work keeps failing, one line this often, not one a round


class Periodic:
    """Calls ``work`` every ``interval_seconds`` on its own thread until `stop`.

    An exception is logged and the next round goes ahead: a sweeper must outlive a passing
    Kafka or Cassandra hiccup. While the work keeps failing (an engine is away), it is logged
    once every `REPEAT_LOG_SECONDS` with the count, and once when it works again.
    """

    def __init__(self, name: str, interval_seconds: float, work: Callable[[], object]) -> None:
        self._name = name
        self._interval = interval_seconds
        self._work = work
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout_seconds: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_seconds)

    def _run(self) -> None:
        failures, logged_at = 0, 0.0
        while not self._stopping.wait(self._interval):
            try:
                self._work()
            except Exception:
                failures += 1
                if failures == 1 or time.monotonic() - logged_at >= REPEAT_LOG_SECONDS:
                    logged_at = time.monotonic()
                    log.exception("periodic work failed", extra={
                        "work": self._name, "failures": failures})
                continue
            if failures:
                log.info("periodic work works again", extra={
                    "work": self._name, "failures": failures})
                failures = 0
