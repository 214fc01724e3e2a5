"""Background work repeated at an interval (sweepers, heartbeats), stoppable at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``work`` every ``interval_seconds`` on its own thread until `stop`.

    An exception is logged and the next round goes ahead: a sweeper must outlive a passing
    Kafka or Cassandra hiccup.
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
        while not self._stopping.wait(self._interval):
            try:
                self._work()
            except Exception:
                log.exception("periodic work failed", extra={"work": self._name})
