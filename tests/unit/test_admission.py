"""Fair back-pressure at the gateway: who is refused when the backlog is deep."""

from __future__ import annotations

import random

from google.rpc import error_details_pb2

from libs.errors import ResourceExhausted
from services.gateway.admission import Admission, BacklogView, SampleAndHold
from tests.helpers import Clock


def sampler(clock: Clock, seed: int = 7) -> SampleAndHold:
    return SampleAndHold(probability=0.01, interval=5, clock=clock,
                         rng=random.Random(seed).random)


def test_sample_and_hold_finds_the_heavy_hitter_and_estimates_shares():
    clock = Clock()
    held = sampler(clock)
    for _ in range(50):  # one second of A at 1,000 a second, B and C at 50
        for _ in range(20):
            held.add("a", 1)
        held.add("b", 1)
        held.add("c", 1)
        clock.now += 0.02
    share, tenants = held.share("a")
    assert share > 0.9 and tenants >= 1


def test_shares_cover_the_last_full_interval_and_a_silent_spell_forgets():
    clock = Clock()
    held = sampler(clock)
    held.add("a", 1000)  # a big submission is sampled at once
    clock.now = 6  # the next interval: the last one still counts
    assert held.share("a") == (1.0, 1)
    clock.now = 30
    assert held.share("a") == (0.0, 0)


def refusal(admission: Admission, tenant: str, tasks: int = 1) -> ResourceExhausted | None:
    try:
        admission.admit(tenant, tasks)
    except ResourceExhausted as exc:
        return exc
    return None


def test_a_tenant_over_its_own_backlog_is_refused_with_retry_and_quota_details():
    admission = Admission(backlog_threshold=1000, tenant_threshold=100)
    admission.update(BacklogView(waiting=150, tenants={"a": 120}))
    error = refusal(admission, "a")
    assert error is not None and error.reason == "TENANT_BACKLOG"
    retry, quota = [d for d in error.details()
                    if not isinstance(d, error_details_pb2.ErrorInfo)]
    assert retry.retry_delay.seconds == 1
    assert quota.violations[0].subject == "tenant:a"
    assert refusal(admission, "b") is None  # under the total: the others go on


def test_past_the_total_only_tenants_over_their_fair_share_are_refused():
    clock = Clock()
    admission = Admission(backlog_threshold=1000, tenant_threshold=10_000,
                          sampler=sampler(clock))
    admission.update(BacklogView(waiting=5000))
    refused: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    for _ in range(500):  # ten seconds: A at 20 times the rate of B and of C
        for tenant in ["a"] * 20 + ["b", "c"]:
            if refusal(admission, tenant) is not None:
                refused[tenant] += 1
        clock.now += 0.02
    assert refused["a"] >= 0.9 * sum(refused.values()) and refused["a"] > 9000
    assert refused["b"] == refused["c"] == 0


def test_a_lone_tenant_is_not_refused_for_its_share_and_under_the_total_no_one_is():
    clock = Clock()
    admission = Admission(backlog_threshold=1000, tenant_threshold=10_000,
                          sampler=sampler(clock))
    admission.update(BacklogView(waiting=5000))
    assert all(refusal(admission, "a", 100) is None for _ in range(10))
    admission.update(BacklogView(waiting=10))
    for tenant in ("b", "a", "c"):
        assert refusal(admission, tenant, 100) is None
