"""The router's allocator of cluster-wide limits: fair targets, the safety of the sum while
shares move, the learning period after a restart, and forgetting silent dispatchers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, note, settings, strategies as st

from services.router.limits import Allocator, Demand, Grant, Key, Limits
from tests.helpers import Clock

KEY: Key = ("acme", "resize")


@dataclass
class Dispatcher:
    """A simulated dispatcher that obeys the grant it holds."""

    name: str
    waiting: int = 0
    out: int = 0
    rate: float = 0.0  # the grant it holds
    slots: int = 0

    def demand(self, limits: Limits, key: Key = KEY) -> Demand:
        return Demand(key, limits, self.waiting, self.out, self.rate, self.slots)

    def report(self, allocator: Allocator, limits: Limits) -> Grant:
        [grant] = allocator.share(self.name, [self.demand(limits)])
        self.rate, self.slots = grant.rate, grant.slots
        return grant


def rounds(allocator: Allocator, limits: Limits, dispatchers: list[Dispatcher],
           n: int = 4) -> None:
    for _ in range(n):
        for d in dispatchers:
            d.report(allocator, limits)


def test_two_dispatchers_with_equal_backlogs_get_half_each():
    limits = Limits(rate=20.0, concurrency=10)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b = Dispatcher("a", waiting=1000), Dispatcher("b", waiting=1000)
    rounds(allocator, limits, [a, b])
    assert (a.slots, b.slots) == (5, 5)
    assert (a.rate, b.rate) == (10.0, 10.0)
    assert allocator.view(KEY) == {"a": Grant(KEY, 10.0, 10.0, 5),
                                   "b": Grant(KEY, 10.0, 10.0, 5)}


def test_a_small_backlog_gets_what_it_can_use_and_a_big_one_the_rest():
    limits = Limits(rate=100.0, concurrency=10)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    small, big = Dispatcher("small", waiting=1), Dispatcher("big", waiting=10_000)
    rounds(allocator, limits, [small, big])
    assert small.rate == pytest.approx(1.0) and big.rate == pytest.approx(99.0)
    assert (small.slots, big.slots) == (1, 9)


def test_odd_slots_go_to_the_first_by_name_and_the_total_is_the_cap():
    limits = Limits(concurrency=3)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b = Dispatcher("a", waiting=50), Dispatcher("b", waiting=50)
    rounds(allocator, limits, [b, a])
    assert (a.slots, b.slots) == (2, 1)


def test_capacity_nobody_wants_is_headroom_for_those_with_work():
    limits = Limits(rate=10.0, concurrency=10)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b, idle = Dispatcher("a", waiting=1), Dispatcher("b", out=1), Dispatcher("idle")
    rounds(allocator, limits, [a, b, idle])
    assert (a.slots, b.slots, idle.slots) == (5, 5, 0)
    # The rate is for draining backlogs: a dispatcher with nothing waiting gets none.
    assert (a.rate, b.rate, idle.rate) == (10.0, 0.0, 0.0)


def test_a_shrunk_share_goes_to_the_other_only_once_its_holder_reports_it():
    limits = Limits(concurrency=10)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b = Dispatcher("a", waiting=100), Dispatcher("b", waiting=100)
    assert a.report(allocator, limits).slots == 10  # alone, it gets everything
    assert b.report(allocator, limits).slots == 0  # a may be using all 10
    assert a.report(allocator, limits).slots == 5  # shrinks at once in the response...
    assert b.report(allocator, limits).slots == 0  # ...but a has not said it holds 5 yet
    assert a.report(allocator, limits).slots == 5  # now it has
    assert b.report(allocator, limits).slots == 5


def test_attempts_out_stay_counted_after_a_share_shrinks():
    limits = Limits(concurrency=10)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b = Dispatcher("a", waiting=100), Dispatcher("b", waiting=100)
    a.report(allocator, limits)
    a.out, a.waiting = 8, 92  # a used its whole grant of 10 while it lasted
    rounds(allocator, limits, [b, a])
    assert (a.slots, b.slots) == (5, 2)  # b gets what a's 8 attempts leave
    a.out = 5
    rounds(allocator, limits, [a, b], n=1)
    assert (a.slots, b.slots) == (5, 5)


def test_while_learning_nobody_gets_more_than_it_holds():
    clock = Clock(1000.0)
    limits = Limits(rate=10.0, concurrency=10)
    allocator = Allocator(clock=clock, learning=2.0)
    a = Dispatcher("a", waiting=100, rate=2.0, slots=3)  # held from before the restart
    b = Dispatcher("b", waiting=100)
    clock.now += 0.5
    rounds(allocator, limits, [a, b])
    assert (a.rate, a.slots, b.rate, b.slots) == (2.0, 3, 0.0, 0)
    clock.now += 1.5
    rounds(allocator, limits, [a, b])
    assert (a.rate, a.slots, b.rate, b.slots) == (5.0, 5, 5.0, 5)


def test_the_burst_is_split_in_proportion_to_the_rate_and_is_at_least_one():
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b = Dispatcher("a", waiting=1000), Dispatcher("b", waiting=1000)
    rounds(allocator, Limits(rate=10.0, burst=30), [a, b])
    assert [g.burst for g in allocator.view(KEY).values()] == [15.0, 15.0]
    rounds(allocator, Limits(rate=10.0), [a, b])  # burst 0: max(1, ceil(rate)) = 10
    assert [g.burst for g in allocator.view(KEY).values()] == [5.0, 5.0]
    a.waiting = 1
    rounds(allocator, Limits(rate=100.0, burst=4), [a, b])
    assert allocator.view(KEY)["a"] == Grant(KEY, 1.0, 1.0, 0)  # 4 x 1/100, raised to 1
    assert allocator.view(KEY)["b"] == Grant(KEY, 99.0, pytest.approx(3.96), 0)


def test_unlimited_keys_get_an_empty_grant_and_are_not_stored():
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    limited, free = ("acme", ""), ("acme", "free")
    grants = allocator.share("a", [
        Demand(free, Limits(), 5, 0, 0.0, 0),
        Demand(limited, Limits(concurrency=4), 5, 0, 0.0, 0),
    ])
    assert grants == [Grant(free, 0.0, 0.0, 0), Grant(limited, 0.0, 0.0, 4)]
    assert allocator.view(free) == {}
    assert set(allocator._keys) == {limited}


def test_a_key_left_out_of_a_report_is_released_and_an_empty_key_deleted():
    limits = Limits(concurrency=10)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    a, b = Dispatcher("a", waiting=100), Dispatcher("b", waiting=100)
    rounds(allocator, limits, [a, b])
    other: Key = ("acme", "other")
    allocator.share("a", [Demand(other, limits, 1, 0, 0.0, 0)])
    assert set(allocator.view(KEY)) == {"b"}
    assert b.report(allocator, limits).slots == 10
    allocator.share("b", [])
    assert allocator.view(KEY) == {}
    assert set(allocator._keys) == {other}


def test_a_silent_dispatcher_is_forgotten_after_forget_after():
    clock = Clock(1000.0)
    limits = Limits(rate=10.0, concurrency=10)
    allocator = Allocator(clock=clock, forget_after=10.0, learning=0.0)
    a, b = Dispatcher("a", waiting=100), Dispatcher("b", waiting=100)
    rounds(allocator, limits, [a, b])
    t0 = clock.now
    clock.now = t0 + 9.5
    assert a.report(allocator, limits).slots == 5  # b may still be alive and using 5
    clock.now = t0 + 10  # b is now 10 s silent
    assert set(allocator.view(KEY)) == {"a"}
    assert a.report(allocator, limits).slots == 10
    assert a.rate == 10.0
    clock.now += 10
    assert allocator.view(KEY) == {}
    assert allocator._keys == {} and allocator._heard == {} and allocator._reported == {}


# The safety property: random interleavings of dispatchers that obey the grants they hold.

# A step: one dispatcher's round (some attempts end, it reports, it dispatches what its grant
# allows), a round whose response is lost, a dispatcher going idle, time passing, or a
# restart of the router. Each is drawn as one integer and decoded: drawing a tuple of five
# sampled values costs hypothesis several times as much as the simulation itself.
KINDS = ("round",) * 5 + ("lost", "idle", "tick", "restart")
WAITING = (0, 1, 2, 5, 12)
ENDED = (0, 0, 0, 1, 3)  # attempts mostly stay out: a grant shrunk below them is the hard case
DISPATCHED = (0, 1, 99)  # at most this many of what the grant allows
STEP_CHOICES = len(KINDS) * 4 * len(WAITING) * len(ENDED) * len(DISPATCHED)


def decode(step: int) -> tuple[str, int, int, int, int]:
    """(kind, dispatcher index, waiting, attempts ended, most to dispatch)."""
    step, kind = divmod(step, len(KINDS))
    step, who = divmod(step, 4)
    step, waiting = divmod(step, len(WAITING))
    step, ended = divmod(step, len(ENDED))
    return KINDS[kind], who, WAITING[waiting], ENDED[ended], DISPATCHED[step]


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(n=st.integers(2, 4), cap=st.integers(1, 6),
       rate=st.floats(0.1, 500.0, allow_nan=False),
       steps=st.lists(st.integers(0, STEP_CHOICES - 1), min_size=20, max_size=60))
def test_the_sum_in_use_never_exceeds_the_limits(n: int, cap: int, rate: float,
                                                 steps: list[int]) -> None:
    clock = Clock(1000.0)
    limits = Limits(rate=rate, concurrency=cap)
    learning = 1.0
    allocator = Allocator(clock=clock, forget_after=1e6, learning=0.0)
    sims = [Dispatcher(f"d{i}") for i in range(n)]
    unheard: set[str] = set()  # since the last restart
    learning_until = clock.now

    for step in steps:
        kind, who, amount, ended, dispatched = decode(step)
        note(f"{kind} by d{who % n}: waiting {amount}, {ended} end, dispatches <= {dispatched}")
        d = sims[who % n]
        if kind in ("round", "lost"):
            d.out -= min(ended, d.out)
            d.waiting = amount
            if kind == "round":
                d.report(allocator, limits)
            else:  # the router granted, the response never arrived
                allocator.share(d.name, [d.demand(limits)])
            k = max(0, min(d.slots - d.out, d.waiting, dispatched))
            d.out, d.waiting = d.out + k, d.waiting - k
        elif kind == "idle" and d.out == 0:
            # Nothing out or waiting: it drops the key and whatever it held for it.
            d.waiting, d.rate, d.slots = 0, 0.0, 0
            allocator.share(d.name, [])
        elif kind == "tick":
            elapsed = amount * 0.05
            if unheard:
                # The learning period assumes everyone reports within it.
                elapsed = min(elapsed, max(0.0, learning_until - clock.now - 0.01))
            clock.now += elapsed
        elif kind == "restart":
            # A new router knows nothing; the dispatchers keep what they hold and have out.
            allocator = Allocator(clock=clock, forget_after=1e6, learning=learning)
            unheard = {s.name for s in sims}
            learning_until = clock.now + learning
        if kind in ("round", "lost", "idle"):
            unheard.discard(d.name)

        # What each may have out: its grant, or more if attempts were out when it shrank.
        assert sum(max(s.out, s.slots) for s in sims) <= cap
        assert sum(s.rate for s in sims) <= rate * (1 + 1e-9)
        assert all(s.slots >= 0 and s.rate >= 0 for s in sims)

    # Whoever goes silent is forgotten: only the one still reporting remains.
    clock.now += 1e6
    sims[0].waiting = 1
    sims[0].report(allocator, limits)
    assert set(allocator.view(KEY)) == {"d0"}


def test_three_dispatchers_settle_on_max_min_fair_shares():
    limits = Limits(rate=30.0, concurrency=9)
    allocator = Allocator(clock=Clock(1000.0), learning=0.0)
    sims = [Dispatcher("d0", waiting=2), Dispatcher("d1", waiting=40),
            Dispatcher("d2", waiting=40)]
    rounds(allocator, limits, sims)
    assert [s.slots for s in sims] == [2, 4, 3]
    assert [s.rate for s in sims] == [2.0, 14.0, 14.0]
