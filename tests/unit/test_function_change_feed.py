"""FunctionChangeFeed: each change reported once although reads overlap; a failed read drops
what the caches hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.cassandra.functions import CHANGE_LOOKBACK, FunctionChangeFeed

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


class Log:
    def __init__(self) -> None:
        self.rows: list[tuple[datetime, str, str]] = []
        self.asked: list[datetime] = []
        self.down = False

    def changes(self, since: datetime) -> list[tuple[datetime, str, str]]:
        self.asked.append(since)
        if self.down:
            raise ConnectionError("Cassandra is away")
        return [row for row in self.rows if row[0] > since]


def feed_of(log: Log) -> tuple[FunctionChangeFeed, list[tuple[str, str]], list[str]]:
    changed: list[tuple[str, str]] = []
    lost: list[str] = []
    feed = FunctionChangeFeed(log, on_change=lambda t, n: changed.append((t, n)),  # type: ignore[arg-type]
                              on_lost=lambda: lost.append("lost"))
    return feed, changed, lost


def test_a_change_is_reported_once_though_each_read_looks_back():
    log = Log()
    feed, changed, _ = feed_of(log)
    log.rows.append((T0, "acme", "resize"))
    feed.poll()
    feed.poll()
    log.rows.append((T0 + timedelta(milliseconds=1), "acme", "resize"))  # changed again
    feed.poll()
    assert changed == [("acme", "resize"), ("acme", "resize")]
    assert log.asked[1] <= log.asked[0] + CHANGE_LOOKBACK  # the second read looked back


def test_a_failed_read_drops_the_caches_and_the_next_read_goes_on():
    log = Log()
    feed, changed, lost = feed_of(log)
    log.down = True
    with pytest.raises(ConnectionError):
        feed.poll()
    assert lost == ["lost"] and changed == []
    log.down = False
    log.rows.append((datetime.now(UTC), "acme", "resize"))
    feed.poll()
    assert changed == [("acme", "resize")]
