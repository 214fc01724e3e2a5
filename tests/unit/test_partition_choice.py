"""Where a gateway sends a new task within its shard, and the busy partitions it learns of."""

from __future__ import annotations

from services.gateway.engine import Shard, pick_partition
from services.router.backlog import Backlogs


def test_a_busy_partition_is_avoided_while_its_shard_has_a_calm_one():
    shard = Shard("weir.tasks.high", (3, 7))
    busy = {("weir.tasks.high", 3): 500, ("weir.tasks.normal", 7): 900}  # another topic's 7
    assert {pick_partition(shard, busy) for _ in range(50)} == {7}


def test_with_every_partition_busy_the_least_busy_is_chosen_and_with_none_any():
    shard = Shard("t", (3, 7))
    assert pick_partition(shard, {("t", 3): 500, ("t", 7): 200}) == 7
    assert {pick_partition(shard, {}) for _ in range(100)} == {3, 7}


def test_the_router_lists_busy_partitions_taking_the_larger_of_two_owners_reports():
    now = [0.0]
    backlogs = Backlogs(clock=lambda: now[0], forget_after=10)
    backlogs.report("d1", {"a": 150}, {("t", 1): 150, ("t", 2): 20})
    backlogs.report("d2", {"a": 90}, {("t", 1): 90})  # taking partition 1 over from d1
    assert backlogs.partitions(min_waiting=100) == {("t", 1): 150}
    now[0] = 10  # d1 and d2 fell silent
    assert backlogs.partitions(min_waiting=0) == {}
