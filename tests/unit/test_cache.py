"""The read-through cache: expiry, and reads that never wait on a fetch."""

from __future__ import annotations

import threading

from libs.cache import TtlCache
from tests.helpers import Clock, eventually


def test_get_fetches_once_per_ttl():
    fetched = []
    clock = Clock()
    cache = TtlCache(lambda k: fetched.append(k) or len(fetched), ttl=1.0, clock=clock)
    assert (cache.get("a"), cache.get("a")) == (1, 1)
    clock.now = 1.5
    assert cache.get("a") == 2


def test_get_nowait_answers_at_once_and_refreshes_in_the_background():
    release = threading.Event()
    values = iter(["old", "new"])

    def slow_fetch(key: str) -> str:
        release.wait(10)
        return next(values)

    clock = Clock()
    cache = TtlCache(slow_fetch, ttl=1.0, clock=clock)
    assert cache.get_nowait("a", default="assumed") == "assumed"  # nothing cached yet
    release.set()
    eventually(lambda: cache.get_nowait("a") == "old", timeout=10)
    release.clear()
    clock.now = 2.0  # expired: the stale value comes back while the refresh waits
    assert cache.get_nowait("a") == "old"
    release.set()
    eventually(lambda: cache.get_nowait("a") == "new", timeout=10)
