"""Cluster-wide shares of each function's dispatch limits (after Google's Doorman).

A function's tasks may wait at several dispatchers, each owning some Kafka partitions, while
its limits (a rate, a burst, a concurrency) hold across the cluster. About four times a second
every dispatcher reports, per limited key, what it has waiting, out and held, and `share`
answers with its part of each limit.

Targets are max-min fair over what the dispatchers want. What the caller may take is bounded
by what the others might still be using — what they have out, what they were last granted,
what they last said they hold — so the sum in use never exceeds a limit even while shares
move: a shrunk share reaches the others only once its holder has reported the smaller grant,
one round trip later. A restarted allocator knows none of that, so for its first `learning`
seconds it never grants anyone more than it already holds. Nothing here does I/O.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

Key = tuple[str, str]  # (tenant_id, function); function "" covers all the tenant's functions
# A float rate below this is rounding left over from subtracting shares, not a share.
TINY_RATE = 1e-9


@dataclass(frozen=True)
class Adaptive:
    """AIMD of a key's rate against a throttling downstream (see weir.v1.AdaptiveRate)."""

    increase_per_second: float = 1.0
    decrease_factor: float = 0.9
    min_throttled_attempts: int = 3
    min_throttled_ratio: float = 0.05
    floor: float = 1.0


@dataclass(frozen=True)
class Limits:
    """A key's limits; 0 means none (for burst: max(1, ceil(rate)))."""

    rate: float = 0.0
    burst: int = 0
    concurrency: int = 0
    adaptive: Adaptive | None = None  # the rate adapts below `rate`

    @property
    def limited(self) -> bool:
        return self.rate > 0 or self.concurrency > 0

    @property
    def effective_burst(self) -> int:
        return self.burst if self.burst > 0 else max(1, math.ceil(self.rate))


@dataclass(frozen=True)
class Demand:
    """One dispatcher's view of one key."""

    key: Key
    limits: Limits  # as the dispatcher last read them; each call uses the caller's
    waiting: int  # tasks ready at this dispatcher but held back
    out: int  # attempts out at executors from this dispatcher now
    held_rate: float  # the rate grant it holds now (0 if none)
    held_slots: int  # the concurrency grant it holds now (0 if none)
    ended: int = 0  # attempts ended since its last report (for an adaptive rate)
    throttled: int = 0  # of which THROTTLED


@dataclass(frozen=True)
class Grant:
    """One dispatcher's share of one key's limits."""

    key: Key
    rate: float  # dispatches/second (meaningful when limits.rate > 0)
    burst: float  # its bucket size: its share of the key's burst
    slots: int  # attempts it may have out at once (meaningful when limits.concurrency > 0)


@dataclass
class _Holder:
    """A dispatcher's last report for a key, and what it was last granted."""

    waiting: int
    out: int
    held_rate: float
    held_slots: int
    rate: float = 0.0
    burst: float = 0.0
    slots: int = 0

    def reserved_slots(self) -> int:
        # It may hold either the grant last sent or the one it last reported (a response
        # may not have reached it yet), and attempts out stay out when a grant shrinks.
        return max(self.out, self.slots, self.held_slots)

    def reserved_rate(self) -> float:
        return max(self.rate, self.held_rate)


@dataclass(frozen=True)
class AdaptiveView:
    rate: float
    last_decision: str
    decision_time: datetime | None


@dataclass
class _Adaptive:
    rate: float
    window_start: float  # monotonic
    seen: float  # monotonic: the last report of the key
    ended: int = 0
    throttled: int = 0
    waited: bool = False  # tasks waited in this window: worth growing the rate
    last_decision: str = ""
    decision_time: datetime | None = None


class AdaptiveRates:
    """AIMD per key, decided once a second from the attempts all dispatchers saw end: down
    by a factor when enough of them were THROTTLED, else up by a step while tasks wait.
    Kept for `KEEP_SECONDS` after a key's last report, so a function that pauses between
    bursts does not start again at its ceiling against a downstream that throttled it."""

    WINDOW_SECONDS = 1.0
    KEEP_SECONDS = 600.0

    def __init__(self, *, wall: Callable[[], datetime]) -> None:
        self._wall = wall
        self._states: dict[Key, _Adaptive] = {}

    def observe(self, key: Key, demand: Demand, now: float) -> None:
        adaptive, ceiling = demand.limits.adaptive, demand.limits.rate
        if adaptive is None or ceiling <= 0:
            self._states.pop(key, None)
            return
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _Adaptive(rate=ceiling, window_start=now, seen=now)
        state.seen = now
        state.ended += demand.ended
        state.throttled += demand.throttled
        state.waited = state.waited or demand.waiting > 0
        elapsed = now - state.window_start
        if elapsed >= self.WINDOW_SECONDS:
            self._decide(state, adaptive, ceiling, elapsed)
            state.window_start, state.ended, state.throttled, state.waited = now, 0, 0, False
        state.rate = min(ceiling, max(min(adaptive.floor, ceiling), state.rate))
        for stale in [k for k, s in self._states.items() if now - s.seen > self.KEEP_SECONDS]:
            del self._states[stale]

    def _decide(self, state: _Adaptive, adaptive: Adaptive, ceiling: float,
                elapsed: float) -> None:
        floor = min(adaptive.floor, ceiling)
        if state.throttled >= adaptive.min_throttled_attempts and \
                state.throttled >= adaptive.min_throttled_ratio * state.ended:
            rate = max(floor, state.rate * adaptive.decrease_factor)
            verdict = f"decreased to {rate:.1f}/s: {state.throttled} of {state.ended} " \
                      "attempts throttled"
        elif state.waited and state.rate < ceiling:
            # (A key silent for a while does not bank the growth of its silence.)
            step = adaptive.increase_per_second * min(elapsed, 2 * self.WINDOW_SECONDS)
            rate = min(ceiling, state.rate + step)
            verdict = f"increased to {rate:.1f}/s: {state.throttled} of {state.ended} " \
                      "attempts throttled, tasks waiting"
        else:
            return
        state.rate, state.last_decision, state.decision_time = rate, verdict, self._wall()

    def rate(self, key: Key, limits: Limits) -> float:
        """The rate to share now: the adapted one, or the limit itself."""
        state = self._states.get(key)
        return state.rate if state is not None and limits.adaptive is not None else limits.rate

    def view(self, key: Key) -> AdaptiveView | None:
        state = self._states.get(key)
        if state is None:
            return None
        return AdaptiveView(state.rate, state.last_decision, state.decision_time)


class Allocator:
    """Shares each key's limits among the dispatchers that report it. Thread-safe."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 forget_after: float = 10.0, learning: float = 2.0,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self._rates = AdaptiveRates(wall=wall)
        self._forget_after = forget_after
        self._learning_until = clock() + learning
        self._lock = threading.Lock()
        self._keys: dict[Key, dict[str, _Holder]] = {}
        self._heard: dict[str, float] = {}  # dispatcher -> when it last reported a key
        self._reported: dict[str, set[Key]] = {}  # dispatcher -> the keys it reported last

    def share(self, dispatcher_id: str, demands: Sequence[Demand]) -> list[Grant]:
        """Replaces the dispatcher's demands with these; returns one Grant per demand."""
        with self._lock:
            now = self._clock()
            self._forget(now, keep=dispatcher_id)
            latest = {d.key: d for d in demands}  # a key twice: the later demand wins
            limited = {k: d for k, d in latest.items() if d.limits.limited}
            for key in self._reported.pop(dispatcher_id, set()) - limited.keys():
                self._drop(key, dispatcher_id)
            if limited:
                self._reported[dispatcher_id] = set(limited)
                self._heard[dispatcher_id] = now
            else:
                self._heard.pop(dispatcher_id, None)
            for key, d in limited.items():
                self._rates.observe(key, d, now)
                holders = self._keys.setdefault(key, {})
                holder = holders.get(dispatcher_id)
                if holder is None:
                    holders[dispatcher_id] = _Holder(d.waiting, d.out, d.held_rate, d.held_slots)
                else:
                    holder.waiting, holder.out = d.waiting, d.out
                    holder.held_rate, holder.held_slots = d.held_rate, d.held_slots
            learning = now < self._learning_until
            grants = {key: self._grant(dispatcher_id, key, d.limits, learning)
                      for key, d in limited.items()}
            return [grants.get(d.key) or Grant(d.key, 0.0, 0.0, 0) for d in demands]

    def adaptive(self, key: Key) -> AdaptiveView | None:
        """A key's adaptive rate now, if it has one."""
        with self._lock:
            return self._rates.view(key)

    def view(self, key: Key) -> dict[str, Grant]:
        """The grants last sent for the key, by dispatcher."""
        with self._lock:
            self._forget(self._clock(), keep=None)
            return {d: Grant(key, h.rate, h.burst, h.slots)
                    for d, h in self._keys.get(key, {}).items()}

    def _grant(self, me: str, key: Key, limits: Limits, learning: bool) -> Grant:
        holders = self._keys[key]
        mine = holders[me]
        others = [h for d, h in holders.items() if d != me]
        slots = 0
        if limits.concurrency > 0:
            target = _fill_slots(limits.concurrency,
                                 {d: h.waiting + h.out for d, h in holders.items()})[me]
            free = limits.concurrency - sum(h.reserved_slots() for h in others)
            slots = max(0, min(target, free))
            if learning:
                slots = min(slots, mine.held_slots)
        rate = burst = 0.0
        if limits.rate > 0:
            cap = self._rates.rate(key, limits)
            # Enough to drain its backlog within a second; none for an empty queue.
            target_rate = _fill_rate(cap, {d: float(h.waiting) for d, h in holders.items()})[me]
            free_rate = cap - sum(h.reserved_rate() for h in others)
            rate = max(0.0, min(target_rate, free_rate))
            if learning:
                rate = min(rate, mine.held_rate)
            if rate < TINY_RATE:
                rate = 0.0
            else:
                # At least one token, or a small share could never dispatch at all.
                burst = max(1.0, limits.effective_burst * rate / cap)
        mine.rate, mine.burst, mine.slots = rate, burst, slots
        return Grant(key, rate, burst, slots)

    def _forget(self, now: float, keep: str | None) -> None:
        # A dispatcher that stopped reporting has died or lost its partitions; its share
        # (and whatever it had out) is released.
        for dispatcher, heard in list(self._heard.items()):
            if dispatcher != keep and now - heard >= self._forget_after:
                del self._heard[dispatcher]
                for key in self._reported.pop(dispatcher, set()):
                    self._drop(key, dispatcher)

    def _drop(self, key: Key, dispatcher: str) -> None:
        holders = self._keys.get(key)
        if holders is None:
            return
        holders.pop(dispatcher, None)
        if not holders:
            del self._keys[key]


def _fill_slots(cap: int, wants: Mapping[str, int]) -> dict[str, int]:
    """Max-min fair whole shares of `cap`; what nobody wants is spread over those wanting
    any, as headroom for new arrivals. Odd units go to the first by name, so every call
    computes the same shares from the same reports."""
    shares = dict.fromkeys(wants, 0)
    left = cap
    order = sorted(wants, key=lambda d: (wants[d], d))
    for i, d in enumerate(order):
        level, odd = divmod(left, len(order) - i)
        if wants[d] > level:
            # Everyone from here on wants more than an equal split of what is left.
            for j, e in enumerate(sorted(order[i:])):
                shares[e] = level + (j < odd)
            return shares
        shares[d] = wants[d]
        left -= wants[d]
    keen = sorted(d for d in wants if wants[d] > 0)
    if keen:
        level, odd = divmod(left, len(keen))
        for j, d in enumerate(keen):
            shares[d] += level + (j < odd)
    return shares


def _fill_rate(cap: float, wants: Mapping[str, float]) -> dict[str, float]:
    """Max-min fair shares of `cap`; what nobody wants is spread over those wanting any."""
    shares = dict.fromkeys(wants, 0.0)
    left = cap
    order = sorted(wants, key=lambda d: (wants[d], d))
    for i, d in enumerate(order):
        level = left / (len(order) - i)
        if wants[d] > level:
            for e in order[i:]:
                shares[e] = level
            return shares
        shares[d] = wants[d]
        left -= wants[d]
    keen = [d for d in wants if wants[d] > 0]
    for d in keen:
        shares[d] += left / len(keen)
    return shares
