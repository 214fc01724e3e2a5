"""When the router moves a hot tenant to partitions of its own, and back."""

from __future__ import annotations

import pytest

from services.router.hot import HotTenants, Move
from tests.helpers import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


def hot(clock: Clock, *, pool: tuple[int, ...] = (16, 17, 18, 19)) -> HotTenants:
    return HotTenants(pool=pool, shard_size=2, threshold=1000, drained=100, hold=10,
                      clock=clock)


def test_a_backlog_held_past_the_threshold_moves_the_tenant_and_a_drained_one_back(clock):
    tenants = hot(clock)
    assert tenants.observe({"a": 1500, "b": 50}) == []
    clock.now += 9.9
    assert tenants.observe({"a": 1200}) == []  # not yet held for 10 s
    clock.now += 0.1
    [move] = tenants.observe({"a": 1200})
    assert (move.tenant_id, move.partitions) == ("a", (16, 17))
    assert "1,200" in move.reason and "own" in move.reason
    assert tenants.isolated() == {"a": (16, 17)}

    assert tenants.observe({"a": 90}) == []  # drained, not yet for long
    clock.now += 10
    [back] = tenants.observe({})  # absent: nothing waiting
    assert back == Move("a", None, back.reason) and "back" in back.reason
    assert tenants.isolated() == {}


def test_a_backlog_that_dips_under_the_threshold_starts_its_clock_again(clock):
    tenants = hot(clock)
    tenants.observe({"a": 1500})
    clock.now += 6
    tenants.observe({"a": 900})  # a dip: not hot for a moment
    clock.now += 6
    assert tenants.observe({"a": 1500}) == []
    clock.now += 10
    assert [m.tenant_id for m in tenants.observe({"a": 1500})] == ["a"]


def test_a_moved_tenant_whose_backlog_rises_again_stays_moved(clock):
    tenants = hot(clock)
    tenants.restore({"a": [16, 17]})
    tenants.observe({"a": 50})
    clock.now += 6
    tenants.observe({"a": 500})  # not drained any more
    clock.now += 6
    assert tenants.observe({"a": 50}) == [] and tenants.isolated() == {"a": (16, 17)}


def test_each_moved_tenant_has_partitions_no_other_has_and_a_full_pool_moves_no_more(clock):
    tenants = hot(clock)
    tenants.observe({"a": 5000, "b": 3000, "c": 2000})
    clock.now += 10
    moves = tenants.observe({"a": 5000, "b": 3000, "c": 2000})
    # The largest backlogs first; the pool of 4 holds two tenants of 2.
    assert [(m.tenant_id, m.partitions) for m in moves] == [("a", (16, 17)), ("b", (18, 19))]
    assert tenants.observe({"b": 3000, "c": 2000}) == []  # a drained: its clock starts
    clock.now += 10
    [back] = tenants.observe({"b": 3000, "c": 2000})
    assert back.tenant_id == "a"
    clock.now += 0.1
    # c has been hot all along: it takes the freed partitions at once.
    assert [(m.tenant_id, m.partitions) for m in tenants.observe({"b": 3000, "c": 2000})] == [
        ("c", (16, 17))]


def test_a_drained_level_at_or_past_the_threshold_is_refused(clock):
    with pytest.raises(ValueError):
        HotTenants(pool=(4, 5), shard_size=2, threshold=100, drained=100, hold=1, clock=clock)
