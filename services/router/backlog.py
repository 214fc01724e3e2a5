"""The backlog across the dispatchers: tasks they took from Kafka and hold waiting for a slot,
and their estimate of those still unread there, as each last reported it (with its limit
shares, every 250 ms), by tenant and by partition. Gateways admit by it and send new tasks
to the calmer partitions of a shard; the router moves hot tenants by it."""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

PartitionId = tuple[str, int]


@dataclass
class _Report:
    at: float
    tenants: dict[str, int]
    partitions: dict[PartitionId, int] = field(default_factory=dict)


class Backlogs:
    """The latest report of each dispatcher, summed. A dispatcher silent for ``forget_after``
    seconds no longer counts: its partitions have gone to others, who report them."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 forget_after: float = 10.0) -> None:
        self._clock = clock
        self._forget_after = forget_after
        self._reports: dict[str, _Report] = {}
        self._lock = threading.Lock()

    def report(self, dispatcher_id: str, tenants: Mapping[str, int],
               partitions: Mapping[PartitionId, int] | None = None) -> None:
        with self._lock:
            self._reports[dispatcher_id] = _Report(self._clock(), dict(tenants),
                                                   dict(partitions or {}))

    def view(self, *, min_tenant_waiting: int, most: int = 1000
             ) -> tuple[int, list[tuple[str, int]]]:
        """Tasks waiting in all, and the tenants with at least ``min_tenant_waiting`` of
        them (the ``most`` largest, largest first)."""
        totals: Counter[str] = Counter()
        for report in self._live():
            totals.update(report.tenants)
        over = [(t, n) for t, n in totals.items() if n >= min_tenant_waiting]
        return totals.total(), heapq.nlargest(most, over, key=lambda item: item[1])

    def partitions(self, *, min_waiting: int) -> dict[PartitionId, int]:
        """The partitions with at least ``min_waiting`` tasks waiting. Two owners may both
        report a partition while it moves between them: the larger report stands."""
        found: dict[PartitionId, int] = {}
        for report in self._live():
            for partition, waiting in report.partitions.items():
                if waiting >= min_waiting:
                    found[partition] = max(found.get(partition, 0), waiting)
        return found

    def _live(self) -> list[_Report]:
        now = self._clock()
        with self._lock:
            for dispatcher, report in list(self._reports.items()):
                if now - report.at >= self._forget_after:
                    del self._reports[dispatcher]
            return list(self._reports.values())
