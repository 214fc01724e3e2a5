"""The backlog across the dispatchers: tasks they took from Kafka and hold waiting for a slot,
and their estimate of those still unread there, as each last reported it (with its limit
shares, every 250 ms). Gateways admit by it."""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping


class Backlogs:
    """The latest report of each dispatcher, summed. A dispatcher silent for ``forget_after``
    seconds no longer counts: its partitions have gone to others, who report them."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 forget_after: float = 10.0) -> None:
        self._clock = clock
        self._forget_after = forget_after
        self._reports: dict[str, tuple[float, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def report(self, dispatcher_id: str, tenants: Mapping[str, int]) -> None:
        with self._lock:
            self._reports[dispatcher_id] = (self._clock(), dict(tenants))

    def view(self, *, min_tenant_waiting: int, most: int = 1000
             ) -> tuple[int, list[tuple[str, int]]]:
        """Tasks waiting in all, and the tenants with at least ``min_tenant_waiting`` of
        them (the ``most`` largest, largest first)."""
        now = self._clock()
        totals: Counter[str] = Counter()
        with self._lock:
            for dispatcher, (at, tenants) in list(self._reports.items()):
                if now - at >= self._forget_after:
                    del self._reports[dispatcher]
                    continue
                totals.update(tenants)
        over = [(t, n) for t, n in totals.items() if n >= min_tenant_waiting]
        return totals.total(), heapq.nlargest(most, over, key=lambda item: item[1])
