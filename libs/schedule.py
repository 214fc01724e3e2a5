"""Work to run at a later time, without a thread per waiting item."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class Schedule:
    """Runs callables at their due times on a small pool.

    One thread waits for the earliest due item and hands it to the pool, so a long wait (a
    webhook backoff, a timer a second away) holds no pool thread and a slow item delays no
    other. ``clock`` is what due times are measured in: `time.monotonic` for delays,
    `time.time` for wall-clock instants.
    """

    def __init__(self, *, name: str, threads: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._thread = threading.Thread(target=self._run, name=f"{name}-schedule", daemon=True)

    def start(self) -> Schedule:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops handing out work; waits for what runs, drops what still waits."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def at(self, due: float, work: Callable[[], None]) -> None:
        with self._changed:
            heapq.heappush(self._due, (due, next(self._seq), work))
            self._changed.notify_all()

    def _run(self) -> None:
        with self._changed:
            while not self._stopping:
                now = self._clock()
                while self._due and self._due[0][0] <= now:
                    self._pool.submit(heapq.heappop(self._due)[2])
                self._changed.wait(self._due[0][0] - now if self._due else None)
