"""The dispatcher's token bucket: lazy refill from an injected clock, the cap, set and wait."""

from __future__ import annotations

import math

import pytest

from services.dispatcher.limits import TokenBucket
from tests.helpers import Clock


def takes(bucket: TokenBucket) -> int:
    """How many tokens the bucket gives right now."""
    n = 0
    while bucket.take():
        n += 1
        assert n < 10_000
    return n


def test_a_new_bucket_is_empty_so_a_new_grant_releases_no_burst():
    clock = Clock(1000.0)
    bucket = TokenBucket(4.0, 10.0, clock=clock)
    assert not bucket.take()
    assert bucket.wait() == pytest.approx(0.25)


def test_tokens_refill_at_the_rate_up_to_the_burst():
    clock = Clock(1000.0)
    bucket = TokenBucket(4.0, 3.0, clock=clock)
    clock.now += 0.5
    assert takes(bucket) == 2
    clock.now += 100
    assert takes(bucket) == 3


def test_wait_is_the_time_to_the_next_token_and_a_caller_that_waits_gets_it():
    clock = Clock(1000.0)
    bucket = TokenBucket(3.0, 1.0, clock=clock)
    clock.now += 0.1
    assert bucket.wait() == pytest.approx((1 - 0.3) / 3)
    clock.now += bucket.wait()  # lands a rounding error short of a whole token
    assert bucket.wait() == 0.0
    assert bucket.take()
    assert not bucket.take()


def test_at_rate_zero_no_token_ever_comes():
    clock = Clock(1000.0)
    bucket = TokenBucket(0.0, 5.0, clock=clock)
    clock.now += 1e6
    assert not bucket.take()
    assert bucket.wait() == math.inf


def test_set_keeps_the_tokens_earned_at_the_old_rate_capped_at_the_new_burst():
    clock = Clock(1000.0)
    bucket = TokenBucket(1.0, 10.0, clock=clock)
    clock.now += 5
    bucket.set(100.0, 2.0)
    assert takes(bucket) == 2

    bucket = TokenBucket(1.0, 10.0, clock=clock)
    clock.now += 1.5
    bucket.set(100.0, 10.0)  # the 1.5 s before the change earned at 1/s
    assert takes(bucket) == 1
    clock.now += 0.05
    assert takes(bucket) == 5
    assert (bucket.rate, bucket.burst) == (100.0, 10.0)


def test_time_spent_at_rate_zero_earns_nothing_once_a_rate_is_granted():
    clock = Clock(1000.0)
    bucket = TokenBucket(0.0, 0.0, clock=clock)
    clock.now += 100
    bucket.set(2.0, 4.0)
    assert not bucket.take()
    assert bucket.wait() == pytest.approx(0.5)


def test_a_burst_below_one_still_holds_one_token():
    # A small share of a key's burst can be a fraction; it must still be able to dispatch.
    clock = Clock(1000.0)
    bucket = TokenBucket(0.5, 0.25, clock=clock)
    clock.now += 10
    assert takes(bucket) == 1


def test_a_clock_stepping_back_neither_earns_nor_loses_tokens():
    clock = Clock(1000.0)
    bucket = TokenBucket(1.0, 5.0, clock=clock)
    clock.now += 2.5
    assert bucket.take()
    clock.now -= 10
    assert bucket.wait() == 0.0
    assert takes(bucket) == 1
    clock.now += 1
    assert takes(bucket) == 1
