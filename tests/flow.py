"""Shared by the flow-control tests and benchmark: a suite of two dispatchers and two
executors, a function spread over both dispatchers, how many attempts were out at once, and
a throttling downstream."""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter

from cassandra.cluster import Session

from services.dispatcher.limits import TokenBucket
from services.router.engine import shuffle_shard
from tests.helpers import eventually
from tests.suite import Suite


def two_of_each(suite: Suite, cassandra: Session) -> None:
    """Adds a second dispatcher and a second executor-manager (each executor working for
    both dispatchers); returns once both dispatchers own partitions."""
    suite.launch("dispatcher_2", module="dispatcher")
    suite.wait_serving("dispatcher_2")
    both = f"{suite.address('dispatcher')},{suite.address('dispatcher_2')}"
    suite.terminate("executor_manager")
    suite.restart("executor_manager", WEIR_DISPATCHER_ADDRESSES=both)
    suite.launch("executor_manager_2", module="executor_manager",
                 WEIR_DISPATCHER_ADDRESSES=both)
    suite.wait_serving("executor_manager_2")
    topic = f"{suite.config.topic_prefix}.tasks.normal"

    def balanced() -> bool:  # both own half: the group's rebalance is over, not half-way
        owned = Counter(row.owner for row in cassandra.execute(
            "SELECT owner FROM partition_owners WHERE topic = %s", (topic,)))
        return len(owned) == 2 and max(owned.values()) - min(owned.values()) <= 1
    eventually(balanced, timeout=60, message="both dispatchers own half the partitions")


def split_across_owners(cassandra: Session, tenant_id: str, topic: str, partitions: int,
                        prefix: str) -> str:
    """A function name whose shard has partitions at two different dispatchers."""
    owners = {row.partition: row.owner for row in cassandra.execute(
        "SELECT partition, owner FROM partition_owners WHERE topic = %s", (topic,))}
    for n in range(1000):
        name = f"{prefix}{n}"
        shard = shuffle_shard(tenant_id, name, partitions=partitions, shard_size=2)
        if len({owners.get(p) for p in shard}) == 2:
            return name
    raise AssertionError(f"no shard spans two owners: {owners}")


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


class ThrottlingDownstream:
    """An HTTP service that answers 429 to calls above ``per_second`` (a token bucket of
    ``burst``); it records each call's time (monotonic) and whether it was served."""

    def __init__(self, per_second: float, *, burst: float = 1.0) -> None:
        self._burst = burst
        self._bucket, self._lock = TokenBucket(per_second, burst), threading.Lock()
        lock = self._lock
        self.calls: list[tuple[float, bool]] = []
        bucket, calls = self._bucket, self.calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                with lock:
                    ok = bucket.take()
                    calls.append((time.monotonic(), ok))
                self.send_response(200 if ok else 429)
                self.end_headers()
                self.wfile.write(b"done" if ok else b"slow down")

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/call"

    def set_rate(self, per_second: float) -> None:
        with self._lock:
            self._bucket.set(per_second, self._burst)

    def __enter__(self) -> ThrottlingDownstream:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
