"""The estimate of tasks still unread on Kafka, by tenant, that admission adds to memory's."""

from __future__ import annotations

from collections import Counter

from services.dispatcher.engine import UnreadBacklog

P1, P2 = ("weir.tasks.normal", 1), ("weir.tasks.normal", 2)


def test_unread_records_count_as_tasks_of_the_tenants_recently_read_there():
    unread = UnreadBacklog()
    for _ in range(20):
        unread.seen(P1, Counter({"a": 90, "b": 10}))  # records of 100 tasks, 9 in 10 A's
    unread.seen(P2, Counter({"c": 1}))
    unread.set_unread({P1: 10, P2: 0})
    assert unread.by_tenant() == {"a": 900, "b": 100}


def test_a_partition_no_longer_ours_and_nothing_unread_count_nothing():
    unread = UnreadBacklog()
    unread.seen(P1, Counter({"a": 5}))
    unread.set_unread({P1: 0})
    assert unread.by_tenant() == {}
    unread.set_unread({})
    unread.seen(P2, Counter({"b": 1}))
    unread.set_unread({P1: 50, P2: 3})
    assert unread.by_tenant() == {"b": 3}  # P1's mix was forgotten when it left


def test_the_mix_follows_recent_records():
    unread = UnreadBacklog()
    unread.seen(P1, Counter({"old": 4000}))
    for _ in range(30):
        unread.seen(P1, Counter({"new": 1000}))
    unread.set_unread({P1: 1})
    estimate = unread.by_tenant()
    assert estimate["new"] > 20 * estimate.get("old", 0)
