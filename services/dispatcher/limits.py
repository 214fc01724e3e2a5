"""A dispatcher's side of the cluster-wide dispatch limits: the shares the router grants it
(`Limiter`) and the token bucket that paces a function at its share's rate (`TokenBucket`).

Tokens refill lazily from the clock, so an idle bucket costs nothing. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from weir.internal.router.v1 import router_pb2
from weir.v1 import common_pb2

# Refilling by `wait()` seconds can land a hair short of a whole token; a caller that
# slept exactly that long should get it rather than spin on ever smaller waits.
EPSILON = 1e-9


class TokenBucket:
    """rate tokens/second up to `burst`; starts empty (a new grant does not release a burst
    at once). Not thread-safe: the dispatcher keeps one per key under its own lock."""

    def __init__(self, rate: float, burst: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._tokens = 0.0
        self._at = clock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def set(self, rate: float, burst: float) -> None:
        """Changes rate and burst, keeping the tokens earned (capped at the new burst)."""
        self._refill()  # what was earned so far, at the old rate
        self._rate, self._burst = rate, burst
        self._tokens = min(self._tokens, self._capacity())

    def take(self) -> bool:
        """Takes one token if one is available."""
        self._refill()
        if self._tokens < 1.0 - EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def available(self) -> int:
        """Whole tokens available now."""
        self._refill()
        return int(self._tokens + EPSILON)

    def wait(self) -> float:
        """Seconds until a token will be available: 0 if now, math.inf if the rate is 0."""
        self._refill()
        if self._tokens >= 1.0 - EPSILON:
            return 0.0
        if self._rate <= 0:
            return math.inf
        return (1.0 - self._tokens) / self._rate

    def _capacity(self) -> float:
        # A bucket that could not hold a whole token would never dispatch at any rate.
        return max(self._burst, 1.0) if self._rate > 0 else max(self._burst, 0.0)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._at)  # a clock that steps back earns nothing
        self._at = now
        if self._rate > 0:
            self._tokens = min(self._capacity(), self._tokens + elapsed * self._rate)


LimitKey = tuple[str, str]  # (tenant_id, function)
PACE_WINDOW_SECONDS = 0.25
# The keys of a limit's quotas by tier: its own key's function (empty for a tenant's) with a
# suffix no function name has ('#'), so they are shared by the router like any other limit.
BELOW_HIGH, LOW_ONLY = "#below-high", "#low"


def tier_quotas(key: LimitKey, limits: common_pb2.RateLimits, priority: int
                ) -> list[tuple[LimitKey, common_pb2.RateLimits]]:
    """The caps a task of ``priority`` also goes out within, from the quotas by priority of
    a concurrency cap: NORMAL and LOW together below ``1 - high_reserved_fraction`` of it,
    LOW alone below ``low_max_fraction`` (rounded down, at least one slot each)."""
    cap = limits.max_concurrent_dispatches
    if not cap or priority == common_pb2.Priority.PRIORITY_HIGH:
        return []
    quotas = []
    if limits.high_reserved_fraction:
        slots = max(1, int(cap * (1 - limits.high_reserved_fraction) + EPSILON))
        quotas.append(((key[0], key[1] + BELOW_HIGH), _capped_at(slots)))
    if limits.low_max_fraction and priority == common_pb2.Priority.PRIORITY_LOW:
        slots = max(1, int(cap * limits.low_max_fraction + EPSILON))
        quotas.append(((key[0], key[1] + LOW_ONLY), _capped_at(slots)))
    return quotas


@functools.lru_cache(maxsize=1024)
def _capped_at(slots: int) -> common_pb2.RateLimits:
    """A concurrency cap, built once per size: it is looked up for every dispatch (read only)."""
    return common_pb2.RateLimits(max_concurrent_dispatches=slots)


@dataclass
class _Share:
    """This dispatcher's share of one function's cluster-wide limits."""

    limits: common_pb2.RateLimits
    bucket: TokenBucket
    slots: int = 0
    expires: float = -math.inf  # monotonic: a share not renewed by then is void
    dispatched: int = 0  # since the last report: its recent pace, part of its demand
    idle_told: bool = False  # the router heard that nothing waits for this rate share
    ended: int = 0  # attempts ended since the last report (an adaptive rate's evidence)
    throttled: int = 0  # of which THROTTLED
    asked: bool = False  # a task was checked against it since the last report


class Limiter:
    """The shares of cluster-wide limits this dispatcher holds, by (tenant, function).

    A function with a rate or a concurrency cap dispatches only within the share the router
    grants this dispatcher (`RouterService.ShareLimits`, renewed by `LimitSync`); with no share,
    or one not renewed in time, it waits. Nothing here does I/O or locks: the owner calls it
    under its own lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._shares: dict[LimitKey, _Share] = {}
        self._reported = clock()
        # Worth asking the router now, not at the next round: a key has no share yet, or a
        # share shrank (the others may use what it gave up once the router hears it holds less).
        self.wanted = False

    @staticmethod
    def applies(limits: common_pb2.RateLimits) -> bool:
        return limits.max_dispatches_per_second > 0 or limits.max_concurrent_dispatches > 0

    def admit(self, limits: list[tuple[LimitKey, common_pb2.RateLimits, int]]
              ) -> LimitKey | None:
        """Whether one more task may go out now within each of ``limits`` (key, its limits,
        its attempts out): None if so, and a token of each is taken; else the key that holds
        it back (nothing is taken)."""
        now = self._clock()
        # Every key is known before any holds the task back: the router hears of all at once.
        shares = [self._share(key, rate_limits) for key, rate_limits, _ in limits]
        for share in shares:
            share.asked = True
        for (key, rate_limits, out), share in zip(limits, shares, strict=True):
            if share.expires <= now:
                return key
            if rate_limits.max_concurrent_dispatches and out >= share.slots:
                return key
            if rate_limits.max_dispatches_per_second and share.bucket.available() < 1:
                return key
        for key, rate_limits, _ in limits:
            share = self._shares[key]
            if rate_limits.max_dispatches_per_second:
                share.bucket.take()
            share.dispatched += 1
        return None

    def releasable(self, key: LimitKey, *, out: int) -> int:
        """How many of the key's held-back tasks could go out now."""
        share = self._shares.get(key)
        if share is None or share.expires <= self._clock():
            return 0
        count = 1 << 30
        if share.limits.max_concurrent_dispatches:
            count = max(0, share.slots - out)
        if share.limits.max_dispatches_per_second:
            count = min(count, share.bucket.available())
        return count

    def demands(self, waiting: Callable[[LimitKey], int], out: Callable[[LimitKey], int]
                ) -> list[router_pb2.LimitDemand]:
        """What to tell the router; keys with nothing waiting, out or held are dropped."""
        now = self._clock()
        # The pace is measured over at least PACE_WINDOW_SECONDS: a prompt report after a few ms
        # would make a handful of dispatches look like a flood.
        elapsed, self._reported = max(now - self._reported, PACE_WINDOW_SECONDS), now
        demands = []
        for key, share in list(self._shares.items()):
            live = share.expires > now
            held_rate = share.bucket.rate if live else 0.0
            held_slots = share.slots if live else 0
            demand = router_pb2.LimitDemand(
                tenant_id=key[0], function=key[1], limits=share.limits,
                # Its backlog plus its pace (per second), so a share in use is kept.
                # A task held back by another of its keys waits for this one too: at least 1.
                waiting=max(waiting(key), int(share.asked))
                + math.ceil(share.dispatched / elapsed), out=out(key),
                held_rate=held_rate, held_slots=held_slots, ended=share.ended,
                throttled=share.throttled)
            share.dispatched = share.ended = share.throttled = 0
            share.asked = False
            if not (demand.waiting or demand.out or held_rate or held_slots or demand.ended):
                del self._shares[key]
                continue
            demands.append(demand)
        self.wanted = False
        return demands

    def apply(self, shares: list[router_pb2.LimitShare], lease: float) -> None:
        """The router's answer: each share holds for ``lease`` seconds from now."""
        expires = self._clock() + lease
        for granted in shares:
            share = self._shares.get((granted.tenant_id, granted.function))
            if share is None:
                continue  # nothing of it waits any more
            if granted.rate < share.bucket.rate or granted.slots < share.slots:
                self.wanted = True
            share.bucket.set(granted.rate, granted.burst)
            share.slots = int(granted.slots)
            share.expires = expires
            share.idle_told = False

    def idle(self, waiting: Callable[[LimitKey], int]) -> bool:
        """Whether a rate share is held with nothing left waiting for it: worth telling the
        router at once, so another dispatcher's backlog may have it (told once per share)."""
        found = False
        for key, share in self._shares.items():
            if share.bucket.rate > 0 and not share.idle_told and not waiting(key):
                share.idle_told = found = True
        return found

    def ended(self, key: LimitKey, *, throttled: bool) -> None:
        """An attempt of the key ended: evidence for its adaptive rate."""
        share = self._shares.get(key)
        if share is not None:
            share.ended += 1
            share.throttled += throttled

    def _share(self, key: LimitKey, limits: common_pb2.RateLimits) -> _Share:
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share(limits, TokenBucket(0.0, 0.0, clock=self._clock))
            self.wanted = True
        share.limits = limits
        return share
