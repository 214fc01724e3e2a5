"""The rules of `weir.v1.RateLimits`, checked where limits come in: the gateway (a function's),
the operator's admin command (a tenant's) and the router (each dispatcher's report)."""

from __future__ import annotations

import math

from weir.v1 import common_pb2

MAX_RATE = 1_000_000.0  # dispatches per second; far beyond what one function can use
MAX_COUNT_LIMIT = 1_000_000  # burst sizes, concurrency caps, throttled-attempt counts


def rate_limit_violations(limits: common_pb2.RateLimits, *, at: str,
                          adaptive: bool = True) -> dict[str, str]:
    """Each field out of range, by path; ``adaptive=False`` (a tenant's) refuses AIMD."""
    problems: dict[str, str] = {}
    rate = limits.max_dispatches_per_second
    if not _number_within(rate, 0, MAX_RATE):
        problems[f"{at}.max_dispatches_per_second"] = (
            f"a number between 0 (no limit) and {MAX_RATE:,.0f}")
    for name in ("max_burst_size", "max_concurrent_dispatches"):
        if not 0 <= getattr(limits, name) <= MAX_COUNT_LIMIT:
            problems[f"{at}.{name}"] = f"between 0 (no limit) and {MAX_COUNT_LIMIT:,}"
    quotas = {"high_reserved_fraction": "between 0 (none kept) and 1, exclusive",
              "low_max_fraction": "between 0 (no cap) and 1"}
    for name, rule in quotas.items():
        value = getattr(limits, name)
        if not _number_within(value, 0, 1) or (name == "high_reserved_fraction" and value == 1):
            problems[f"{at}.{name}"] = rule
        elif value and not limits.max_concurrent_dispatches:
            problems[f"{at}.{name}"] = "needs max_concurrent_dispatches: a share of its slots"
    if limits.adaptive.enabled and not adaptive:
        problems[f"{at}.adaptive"] = "an adaptive rate is a function's, not a tenant's"
    elif limits.adaptive.enabled and not rate > 0:
        problems[f"{at}.adaptive"] = "needs max_dispatches_per_second: its start and ceiling"
    problems.update(adaptive_violations(limits.adaptive, at=f"{at}.adaptive",
                                        ceiling=rate if _number_within(rate, 0, MAX_RATE)
                                        else MAX_RATE))
    return problems


def adaptive_violations(settings: common_pb2.AdaptiveRate, *, at: str,
                        ceiling: float = MAX_RATE) -> dict[str, str]:
    """Each AIMD setting out of range (0 everywhere means its default)."""
    problems: dict[str, str] = {}
    if not _number_within(settings.increase_per_second, 0, MAX_RATE):
        problems[f"{at}.increase_per_second"] = f"between 0 (default 1) and {MAX_RATE:,.0f}"
    if not _number_within(settings.decrease_factor, 0, 1) or settings.decrease_factor == 1:
        problems[f"{at}.decrease_factor"] = "between 0 and 1, exclusive (0: default 0.9)"
    if not 0 <= settings.min_throttled_attempts <= MAX_COUNT_LIMIT:
        problems[f"{at}.min_throttled_attempts"] = (
            f"between 0 (default 3) and {MAX_COUNT_LIMIT:,}")
    if not _number_within(settings.min_throttled_ratio, 0, 1):
        problems[f"{at}.min_throttled_ratio"] = "between 0 (default 0.05) and 1"
    if not _number_within(settings.min_dispatches_per_second, 0, ceiling or MAX_RATE):
        problems[f"{at}.min_dispatches_per_second"] = (
            "between 0 (default 1) and max_dispatches_per_second")
    return problems


def _number_within(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high
