"""AIMD of a function's rate at the router, against a downstream that throttles."""

from __future__ import annotations

from datetime import UTC, datetime

from services.router.limits import Adaptive, Allocator, Demand, Limits
from tests.helpers import Clock

KEY = ("t1", "f")


def allocator(clock: Clock) -> Allocator:
    return Allocator(clock=clock, learning=0, wall=lambda: datetime(2026, 11, 30, tzinfo=UTC))


def report(alloc: Allocator, limits: Limits, *, ended: int = 0, throttled: int = 0,
           waiting: int = 1000, held: float = 0.0) -> float:
    [grant] = alloc.share("d1", [Demand(KEY, limits, waiting=waiting, out=0, held_rate=held,
                                        held_slots=0, ended=ended, throttled=throttled)])
    return grant.rate


def test_the_rate_starts_at_its_ceiling_and_falls_by_the_factor_when_enough_is_throttled():
    clock = Clock(100.0)
    alloc = allocator(clock)
    limits = Limits(rate=100, adaptive=Adaptive(decrease_factor=0.5))
    assert report(alloc, limits) == 100
    clock.now += 1
    assert report(alloc, limits, ended=50, throttled=10) == 50
    view = alloc.adaptive(KEY)
    assert view is not None and view.rate == 50
    assert view.last_decision == "decreased to 50.0/s: 10 of 50 attempts throttled"


def test_a_few_throttled_attempts_or_a_small_ratio_do_not_decrease_it():
    clock = Clock(100.0)
    alloc = allocator(clock)
    limits = Limits(rate=100, adaptive=Adaptive(min_throttled_attempts=3,
                                                min_throttled_ratio=0.05))
    report(alloc, limits)
    clock.now += 1
    assert report(alloc, limits, ended=10, throttled=2) == 100  # under the count
    clock.now += 1
    assert report(alloc, limits, ended=100, throttled=4) == 100  # under the ratio


def test_it_grows_by_its_step_while_tasks_wait_never_past_the_ceiling_nor_below_the_floor():
    clock = Clock(100.0)
    alloc = allocator(clock)
    limits = Limits(rate=10, adaptive=Adaptive(decrease_factor=0.1, increase_per_second=2,
                                               floor=4))
    report(alloc, limits)
    clock.now += 1
    assert report(alloc, limits, ended=10, throttled=10) == 4  # 10 × 0.1 = 1, floored at 4
    clock.now += 1
    assert report(alloc, limits, ended=4) == 6
    clock.now += 1
    report(alloc, limits, ended=6, waiting=0)
    assert alloc.adaptive(KEY).rate == 6  # nothing waits: no growth
    for _ in range(5):
        clock.now += 1
        report(alloc, limits, ended=6)
    assert alloc.adaptive(KEY).rate == 10


def test_against_a_downstream_of_40_a_second_it_settles_near_40_with_few_throttled():
    """The defaults (step 1/s, factor 0.9, 3 attempts and 5 % to decrease), a backlog that
    never runs out and a downstream that throttles every call above 40 in a second."""
    clock = Clock(100.0)
    alloc = allocator(clock)
    limits = Limits(rate=200, adaptive=Adaptive())
    rate, rates, calls, throttled = report(alloc, limits), [], 0, 0
    for second in range(120):
        clock.now += 1
        over = max(0, round(rate) - 40)
        if second >= 60:
            rates.append(rate)
            calls, throttled = calls + round(rate), throttled + over
        rate = report(alloc, limits, ended=round(rate), throttled=over, held=rate)
    assert abs(sum(rates) / len(rates) - 40) <= 4
    assert throttled / calls <= 0.05
