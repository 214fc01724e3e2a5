"""A small read-through cache with expiry, for lookups every request makes (functions, routes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
        self._refreshing: set[tuple] = set()
        self._refresher: ThreadPoolExecutor | None = None

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

    def get_nowait(self, *key: Any, default: Any = None) -> Any:
        """The value cached, without waiting for a fetch: an expired one is returned while a
        background fetch refreshes it; ``default`` when there is none yet (also fetched)."""
        now = self._clock()
        with self._lock:
            hit = self._values.get(key)
            if hit and hit[1] > now:
                return hit[0]
            if key not in self._refreshing:
                self._refreshing.add(key)
                if self._refresher is None:
                    self._refresher = ThreadPoolExecutor(1, thread_name_prefix="cache-refresh")
                self._refresher.submit(self._refresh, key)
        return hit[0] if hit else default

    def _refresh(self, key: tuple) -> None:
        try:
            self.get(*key)
        finally:
            with self._lock:
                self._refreshing.discard(key)

    def reload(self, *key: Any) -> None:
        """Fetches one key now (on the caller's thread), so that readers, `get_nowait`'s
        included, see the new value at once."""
        value = self._fetch(*key)
        with self._lock:
            self._values[key] = (value, self._clock() + self._ttl)

    def forget(self, *key: Any) -> None:
        """Drops one key: its next `get` fetches (after a change made through this process)."""
        with self._lock:
            self._values.pop(key, None)

    def clear(self) -> None:
        """Drops every key: each next `get` fetches (the source changed as a whole)."""
        with self._lock:
            self._values.clear()
