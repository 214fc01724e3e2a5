"""A small read-through cache with expiry, for lookups every request makes (functions, routes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class TtlCache:
    """Remembers ``fetch(*key)`` for ``ttl`` seconds per key, then fetches again."""

    def __init__(self, fetch: Callable[..., Any], *, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._values: dict[tuple, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def get(self, *key: Any) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._values.get(key)
        if hit and hit[1] > now:
            return hit[0]
        value = self._fetch(*key)
        with self._lock:
            self._values[key] = (value, now + self._ttl)
        return value

    def forget(self, *key: Any) -> None:
        """Drops one key: its next `get` fetches (after a change made through this process)."""
        with self._lock:
            self._values.pop(key, None)
