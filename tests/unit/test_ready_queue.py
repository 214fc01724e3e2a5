"""The owner's ready queue: tiers in order with a minimum share for the lower ones, and the
pause of consuming where waiting tasks pile up."""

from __future__ import annotations

from collections import Counter

import pytest
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, tasks_pb2

from libs.cassandra.taskstate import TaskKey
from services.dispatcher.engine import PARTITION_LIMIT, TIER_LIMIT, backlogged
from services.dispatcher.owner import Held, ReadyQueue

HIGH, NORMAL, LOW = (common_pb2.Priority.PRIORITY_HIGH, common_pb2.Priority.PRIORITY_NORMAL,
                     common_pb2.Priority.PRIORITY_LOW)
TOPIC = {HIGH: "weir.tasks.high", NORMAL: "weir.tasks.normal", LOW: "weir.tasks.low"}
SHARES = {NORMAL: 0.2, LOW: 0.1}


def held(priority: int, n: int, partition: int = 0) -> Held:
    return Held(key=TaskKey("t1", f"{priority}-{partition}-{n}"),
                partition=(TOPIC[priority], partition),
                message=records_pb2.TaskMessage(tenant_id="t1", task_id=f"{n}",
                                                priority=priority),
                function=None, state=tasks_pb2.TaskState.TASK_STATE_QUEUED,
                status=records_pb2.TaskStatus(), floor=0)


def fill(queue: ReadyQueue, priority: int, count: int, partition: int = 0) -> None:
    for n in range(count):
        queue.push(held(priority, n, partition))


def tiers_of(queue: ReadyQueue, pops: int) -> list[int]:
    popped = [queue.pop() for _ in range(pops)]
    return [h.message.priority for h in popped if h is not None]


def test_high_goes_first_while_low_gets_exactly_its_share():
    queue = ReadyQueue(SHARES)
    fill(queue, LOW, 100)
    fill(queue, HIGH, 100)
    order = tiers_of(queue, 100)
    assert Counter(order) == {HIGH: 90, LOW: 10}
    assert order[:9] == [HIGH] * 9  # LOW's turn comes once it has earned it, not first


def test_pops_only_high_may_take_count_toward_low_share_and_low_catches_up_after():
    """Every fourth pop is for an executor's HIGH reserve (HIGH only): LOW still gets a
    tenth of all the pops, not a tenth of the others."""
    queue = ReadyQueue(SHARES)
    fill(queue, LOW, 100)
    fill(queue, HIGH, 200)
    popped = [queue.pop(below_high=n % 4 != 3) for n in range(200)]
    lows = sum(h.message.priority == LOW for h in popped if h)
    assert lows in (19, 20)  # 20 owed; the last may still wait for a pop LOW may take
    assert all(h.message.priority == HIGH for n, h in enumerate(popped) if n % 4 == 3)


def test_each_lower_tier_keeps_its_own_share_under_all_three():
    queue = ReadyQueue(SHARES)
    for tier in (LOW, NORMAL, HIGH):
        fill(queue, tier, 2000)
    counts = Counter(tiers_of(queue, 1000))
    assert abs(counts[NORMAL] - 200) <= 1 and abs(counts[LOW] - 100) <= 1


def test_a_lower_tier_alone_takes_everything_and_banks_no_share_while_idle():
    queue = ReadyQueue(SHARES)
    fill(queue, LOW, 50)
    assert tiers_of(queue, 30) == [LOW] * 30  # no one else waits: all of it
    fill(queue, HIGH, 50)
    assert tiers_of(queue, 10) == [HIGH] * 9 + [LOW]  # no burst of LOW for its idle past


def test_within_a_tier_partitions_take_turns():
    queue = ReadyQueue(SHARES)
    fill(queue, NORMAL, 5, partition=1)
    fill(queue, NORMAL, 5, partition=2)
    assert [queue.pop().partition[1] for _ in range(4)] == [1, 2, 1, 2]


def test_shares_that_leave_the_top_tier_nothing_are_refused():
    with pytest.raises(ValueError):
        ReadyQueue({NORMAL: 0.6, LOW: 0.4})


def test_tasks_set_aside_count_as_waiting_until_they_go_and_a_dropped_partition_forgets_them():
    queue = ReadyQueue(SHARES)
    fill(queue, NORMAL, 3, partition=1)
    fill(queue, NORMAL, 2, partition=2)
    first = queue.pop()
    queue.set_aside("cap", first)
    assert queue.waiting() == {("weir.tasks.normal", 1): 3, ("weir.tasks.normal", 2): 2}
    assert (len(queue), queue.aside("cap")) == (4, 1)
    queue.release("cap")
    assert (len(queue), queue.aside("cap"), queue.aside_keys()) == (5, 0, [])
    aside = queue.pop()
    queue.set_aside("cap", aside)
    dropped = queue.drop_partition(aside.partition)
    assert aside in dropped and queue.aside_keys() == []
    assert sum(queue.waiting().values()) == len(queue) == 5 - len(dropped)


def test_consuming_pauses_a_full_partition_and_a_full_tier_but_never_the_other_tiers():
    high, low = [("weir.tasks.high", p) for p in range(3)], [("weir.tasks.low", p)
                                                           for p in range(3)]
    owned = high + low
    assert backlogged({}, owned) == set()
    assert backlogged({high[0]: PARTITION_LIMIT, high[1]: 1}, owned) == {high[0]}
    deep_low = {low[0]: TIER_LIMIT - 10, low[1]: 10}
    assert backlogged(deep_low | {high[0]: 5}, owned) == set(low)
