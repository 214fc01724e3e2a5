"""Turns out-of-order acknowledgements into a safe commit offset, per partition.

Messages of one partition are handed out in offset order but finish in any order (a short
task acked before a long one). Committing the highest acked offset would lose the unfinished
ones on a crash, so the tracker commits only up to the lowest offset still outstanding:
everything before it is done. (cadence `common/messaging/kafka/partition_ack_manager.go`.)

Example: offsets 10, 11, 12 handed out; 12 and 10 acked -> commit 11 (11 is still running);
then 11 acked -> commit 13.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable


class PartitionAckTracker:
    """Outstanding offsets of one partition and the offset it is safe to commit.

    The committed offset follows Kafka's convention: the offset of the next message to read.
    Thread-safe: workers ack from their own threads while the consumer loop commits.
    """

    def __init__(self, *, start_offset: int) -> None:
        self._lock = threading.Lock()
        self._heap: list[int] = []  # offsets handed out; acked ones are popped lazily
        self._pending: set[int] = set()  # offsets handed out and not yet acked
        self._next = start_offset  # one past the highest offset handed out

    def track(self, offset: int) -> None:
        """Records that ``offset`` was handed out. Offsets arrive in increasing order."""
        with self._lock:
            if offset < self._next:
                raise ValueError(f"offset {offset} tracked after {self._next - 1}")
            heapq.heappush(self._heap, offset)
            self._pending.add(offset)
            self._next = offset + 1

    def ack(self, offset: int) -> None:
        """Marks ``offset`` done; acking twice or an offset never tracked is a bug."""
        with self._lock:
            if offset not in self._pending:
                raise ValueError(f"offset {offset} is not outstanding")
            self._pending.remove(offset)
            while self._heap and self._heap[0] not in self._pending:
                heapq.heappop(self._heap)

    def commit_offset(self) -> int:
        """The offset to commit: the lowest one not yet acked, or the next to read."""
        with self._lock:
            return self._heap[0] if self._heap else self._next

    @property
    def outstanding_count(self) -> int:
        with self._lock:
            return len(self._pending)


class Countdown:
    """Calls ``then`` once `tick` has been called ``count`` times, from any threads: a record
    acknowledged once each of its parts (tasks, deliveries) is done."""

    def __init__(self, count: int, then: Callable[[], None]) -> None:
        self._left = count
        self._then = then
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._left -= 1
            finished = self._left == 0
        if finished:
            self._then()
