"""Flow control on the running suite: priority tiers with a starvation bound, and dispatch
limits that hold across the whole cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest
from weir.v1 import common_pb2, tasks_pb2

from libs.cassandra.taskstate import TaskKey, TaskStateStore
from libs.errors import NotFound, ResourceExhausted
from libs.sdk import Client
from tests.flow import ThrottlingDownstream, most_at_once, split_across_owners, two_of_each
from tests.helpers import eventually
from tests.suite import ROOT

State = tasks_pb2.TaskState
HIGH, LOW = common_pb2.Priority.PRIORITY_HIGH, common_pb2.Priority.PRIORITY_LOW


def finished(store: TaskStateStore, tenant_id: str, ids: list[str], *, timeout: float):
    """Every task once it SUCCEEDED (waits for all of them)."""
    def done():
        stored = []
        for start in range(0, len(ids), 200):
            stored += store.get_many(TaskKey(tenant_id, i) for i in ids[start:start + 200])
        unfinished = [s for s in stored if s is None or s.state != State.TASK_STATE_SUCCEEDED]
        assert not unfinished, f"{len(unfinished)} of {len(ids)} not succeeded yet"
        return stored
    return eventually(done, timeout=timeout, interval=0.5, message="every task succeeded")


def test_high_goes_ahead_of_low_while_low_keeps_its_minimum_share(suite, cassandra, tenant):
    """LOW work already queued, then a flood of HIGH that saturates the executor: while HIGH
    waits, HIGH takes most dispatches, and LOW still gets its share (0.1 by default)."""
    tenant_id, api_key = tenant
    client = suite.client(api_key)
    # One batch, so both tiers reach the dispatcher together.
    tiers = [LOW if n % 5 == 0 else HIGH for n in range(600)]
    results = client.create_tasks({"function": "sleep", "payload": b"200", "priority": tier}
                                  for tier in tiers)
    low = {r.task.task_id for r, tier in zip(results, tiers, strict=True) if tier == LOW}
    high = [r.task.task_id for r, tier in zip(results, tiers, strict=True) if tier == HIGH]
    assert all(low) and all(high)

    store = TaskStateStore(cassandra)
    stored = finished(store, tenant_id, [*low, *high], timeout=120)
    dispatched = sorted((s.attempts()[0].dispatch_time.ToNanoseconds(), s.key.task_id in low)
                        for s in stored)
    high_times = [t for t, is_low in dispatched if not is_low]
    # While HIGH waits: from its first dispatch to its last.
    during = [is_low for t, is_low in dispatched if high_times[0] <= t <= high_times[-1]]
    low_share = sum(during) / len(during)
    assert 0.07 <= low_share <= 0.2, (
        f"LOW took {low_share:.1%} of {len(during)} dispatches while HIGH waited")




def test_rate_and_concurrency_limits_hold_across_two_dispatchers_and_two_executors(
        suite, cassandra, tenant):
    """A function's tasks on partitions of two dispatchers, run by two executor-managers: its
    rate limit holds per second and its concurrency cap at every instant, for all together."""
    tenant_id, api_key = tenant
    topic = f"{suite.config.topic_prefix}.tasks.normal"
    try:
        two_of_each(suite, cassandra)
        paced, capped = (split_across_owners(cassandra, tenant_id, topic,
                                             suite.config.task_partitions, prefix)
                         for prefix in ("paced", "capped"))
        store = TaskStateStore(cassandra)
        with suite.client(api_key) as client:
            client.create_function(paced, "examples.demo:sleep", worker_concurrency=8,
                                   rate_limits={"max_dispatches_per_second": 40,
                                                "max_burst_size": 4})
            client.create_function(capped, "examples.demo:sleep", worker_concurrency=8,
                                   rate_limits={"max_concurrent_dispatches": 4})
            paced_ids = [r.task.task_id for r in client.create_tasks(
                {"function": paced, "payload": b"10"} for _ in range(400))]
            capped_ids = [r.task.task_id for r in client.create_tasks(
                {"function": capped, "payload": b"100"} for _ in range(80))]
        stored = finished(store, tenant_id, paced_ids + capped_ids, timeout=120)
    finally:
        suite.terminate("dispatcher_2")
        suite.terminate("executor_manager_2")
        suite.terminate("executor_manager")
        suite.restart("executor_manager")

    by_id = {s.key.task_id: s for s in stored}
    executors = {a.executor_id for s in stored for a in s.attempts()}
    assert len(executors) == 2, executors
    dispatched = sorted(by_id[i].attempts()[0].dispatch_time.ToNanoseconds() for i in paced_ids)
    windows: dict[int, int] = {}
    for t in dispatched:
        windows[(t - dispatched[0]) // 1_000_000_000] = windows.get(
            (t - dispatched[0]) // 1_000_000_000, 0) + 1
    intervals = [(a.dispatch_time.ToNanoseconds(), a.end_time.ToNanoseconds())
                 for i in capped_ids for a in by_id[i].attempts()]
    full = [windows.get(w, 0) for w in range(1, max(windows))]  # after the first, before the last
    # 40 a second on average, and never a second far off it (make bench measures the spread
    # at 50/s with 5,000 queued: docs/benchmarks.md).
    # Never above the limit; below it by up to 10 % on average (a second by up to 25 %): when
    # both cores are saturated (the whole suite running) a dispatcher's pacing runs late and
    # its share of the burst (2 tokens, 100 ms at 20/s) overflows. Two CI runs measured 37.7
    # and 37.9 a second that way, another a second of 33; alone the test measures 40.
    assert len(full) >= 7 and all(30 <= count <= 46 for count in full), str(windows)
    assert 36 <= sum(full) / len(full) <= 42, str(windows)

    assert most_at_once(intervals) == 4


def admin(suite, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.gateway.admin", *args], cwd=ROOT,
                          env=suite.env(), capture_output=True, text=True, timeout=60)


def test_a_tenants_limits_set_by_the_operator_hold_over_all_its_functions(
        suite, cassandra, tenant):
    """The operator caps a tenant at 3 attempts at once; two functions of it, each uncapped,
    together never have more out, and the tenant reads its limits through the API."""
    tenant_id, api_key = tenant
    refused = admin(suite, "set-tenant-limits", tenant_id, "--max-concurrent-dispatches", "-1")
    assert refused.returncode == 2 and "max_concurrent_dispatches" in refused.stderr
    assert admin(suite, "set-tenant-limits", "nobody-here",
                 "--max-concurrent-dispatches", "3").returncode == 2
    done = admin(suite, "set-tenant-limits", tenant_id, "--max-concurrent-dispatches", "3")
    assert done.returncode == 0, done.stderr

    with suite.client(api_key) as client:
        assert client.get_tenant().rate_limits.max_concurrent_dispatches == 3
        client.create_function("sleep2", "examples.demo:sleep", worker_concurrency=8)
        ids = [r.task.task_id for r in client.create_tasks(
            {"function": name, "payload": b"100"} for name in ("sleep", "sleep2") * 30)]
    stored = finished(TaskStateStore(cassandra), tenant_id, ids, timeout=120)
    intervals = [(a.dispatch_time.ToNanoseconds(), a.end_time.ToNanoseconds())
                 for s in stored for a in s.attempts()]
    assert most_at_once(intervals) == 3



def test_an_adaptive_rate_backs_off_a_throttling_downstream_and_shows_why(
        suite, cassandra, tenant):
    """Dispatching starts at the ceiling (40/s) against a downstream that takes 10/s: the
    router lowers the rate as THROTTLED attempts come back, GetFunction shows the rate and the
    decision, and later attempts are far less often throttled than the first ones."""
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    with ThrottlingDownstream(per_second=10) as service, suite.client(api_key) as client:
        client.create_function(
            "caller", "tests.handlers:downstream", worker_concurrency=8,
            retry_config={"max_attempts": 50, "throttled_min_backoff": {"seconds": 1}},
            rate_limits={"max_dispatches_per_second": 40, "adaptive": {
                "enabled": True, "decrease_factor": 0.5, "increase_per_second": 1}})
        ids = [r.task.task_id for r in client.create_tasks(
            {"function": "caller", "payload": service.url.encode()} for _ in range(240))]

        def backed_off() -> common_pb2.AdaptiveRateState:
            state = client.get_function("caller").adaptive_rate_state
            assert state.current_dispatches_per_second < 20
            assert state.last_decision.startswith("decreased to ")
            return state
        eventually(backed_off, timeout=30, interval=0.5)
        stored = finished(store, tenant_id, ids, timeout=180)

    attempts = sorted((a.dispatch_time.ToNanoseconds(),
                       a.error_class == common_pb2.ErrorClass.ERROR_CLASS_THROTTLED)
                      for s in stored for a in s.attempts())
    first, later = attempts[:40], attempts[len(attempts) // 2:]
    first_ratio = sum(t for _, t in first) / len(first)
    later_ratio = sum(t for _, t in later) / len(later)
    assert first_ratio >= 0.5 and later_ratio <= 0.3, (first_ratio, later_ratio)


def test_a_backlogged_tenant_is_refused_at_the_gateway_while_another_is_admitted(
        suite, tenant_factory):
    """A gateway with low thresholds: tenant A piles up tasks behind a concurrency cap of 1;
    once the dispatchers report its backlog, A's submissions are refused RESOURCE_EXHAUSTED
    (RetryInfo, QuotaFailure naming A) and store nothing, while B's are admitted."""
    (a_id, a_key), (_, b_key) = tenant_factory(), tenant_factory()
    suite.launch("gateway_admission", module="gateway", WEIR_ADMISSION_TENANT_BACKLOG="30",
                 WEIR_ADMISSION_BACKLOG="40")
    suite.wait_serving("gateway_admission")
    try:
        with Client(suite.address("gateway_admission"), api_key=a_key, timeout=30) as a, \
                Client(suite.address("gateway_admission"), api_key=b_key, timeout=30) as b:
            a.create_function("slow", "examples.demo:sleep",
                              rate_limits={"max_concurrent_dispatches": 1})
            assert all(r.task.task_id for r in a.create_tasks(
                {"function": "slow", "payload": b"500"} for _ in range(100)))

            probes = iter(range(1000))

            def refused() -> tuple[str, ResourceExhausted]:
                task_id = f"probe-{next(probes)}"
                try:
                    a.create_task("echo", b"one more", task_id=task_id)
                except ResourceExhausted as exc:
                    return task_id, exc
                raise AssertionError("admitted: the backlog is not reported yet")
            task_id, error = eventually(refused, timeout=30, interval=0.25)
            assert error.reason == "TENANT_BACKLOG" and error.retry_after.total_seconds() == 1
            assert error.subject == f"tenant:{a_id}" and "tenant has" in error.message
            with pytest.raises(NotFound):
                a.get_task(task_id)  # nothing was stored
            # The whole backlog is past its 40 too, but B sends little: it is admitted.
            assert b.create_task("echo", b"admitted").task_id
            a.batch_cancel_tasks('function = "slow"')
    finally:
        suite.terminate("gateway_admission")


def test_an_executor_keeps_slots_for_high_work_that_normal_and_low_never_take(
        suite, cassandra, tenant):
    """One executor of 4 slots keeps 1 for HIGH: a LOW backlog runs at most 3 at once, and
    HIGH tasks submitted behind it start while LOW work still waits, not after it."""
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    try:
        suite.terminate("executor_manager")
        suite.restart("executor_manager", WEIR_WORKER_PROCESSES="1", WEIR_WORKER_SLOTS="4",
                      WEIR_EXECUTOR_HIGH_RESERVE="0.25")
        with suite.client(api_key) as client:
            low = [r.task.task_id for r in client.create_tasks(
                {"function": "sleep", "payload": b"200", "priority": LOW} for _ in range(30))]
            eventually(lambda: any(s and s.attempts() and s.attempts()[0].HasField(
                "start_time") for s in store.get_many(TaskKey(tenant_id, i) for i in low)),
                timeout=60, message="LOW work runs")
            high = [r.task.task_id for r in client.create_tasks(
                {"function": "sleep", "payload": b"200", "priority": HIGH} for _ in range(3))]
        stored = finished(store, tenant_id, low + high, timeout=120)
    finally:
        suite.terminate("executor_manager")
        suite.restart("executor_manager")

    by_id = {s.key.task_id: s for s in stored}
    running = [(a.start_time.ToNanoseconds(), a.end_time.ToNanoseconds())
               for i in low for a in by_id[i].attempts()]
    assert most_at_once(running) == 3  # never the 4th, kept slot
    last_low_start = max(start for start, _ in running)
    high_starts = [a.start_time.ToNanoseconds() for i in high for a in by_id[i].attempts()]
    assert all(start < last_low_start for start in high_starts)  # they passed the backlog


def test_a_tenants_quotas_by_priority_keep_room_for_high_and_cap_low(suite, cassandra, tenant):
    """The operator caps a tenant at 4 attempts at once, 1/4 kept for HIGH and LOW at most
    half: LOW never holds more than 2, NORMAL and LOW never more than 3, all never more
    than 4; the tenant reads the quotas through the API."""
    tenant_id, api_key = tenant
    refused = admin(suite, "set-tenant-limits", tenant_id, "--low-max-fraction", "0.5")
    assert refused.returncode == 2 and "needs max_concurrent_dispatches" in refused.stderr
    refused = admin(suite, "set-tenant-limits", tenant_id, "--max-concurrent-dispatches", "4",
                    "--high-reserved-fraction", "1")
    assert refused.returncode == 2 and "high_reserved_fraction" in refused.stderr
    done = admin(suite, "set-tenant-limits", tenant_id, "--max-concurrent-dispatches", "4",
                 "--high-reserved-fraction", "0.25", "--low-max-fraction", "0.5")
    assert done.returncode == 0, done.stderr

    with suite.client(api_key) as client:
        limits = client.get_tenant().rate_limits
        assert (limits.high_reserved_fraction, limits.low_max_fraction) == (0.25, 0.5)
        tiers = [LOW, common_pb2.Priority.PRIORITY_NORMAL] * 15 + [HIGH] * 6
        ids = [r.task.task_id for r in client.create_tasks(
            {"function": "sleep", "payload": b"100", "priority": tier} for tier in tiers)]
    stored = {s.key.task_id: s for s in finished(TaskStateStore(cassandra), tenant_id, ids,
                                                 timeout=120)}

    def at_once(wanted: set[int]) -> int:
        return most_at_once([(a.dispatch_time.ToNanoseconds(), a.end_time.ToNanoseconds())
                             for i, tier in zip(ids, tiers, strict=True) if tier in wanted
                             for a in stored[i].attempts()])
    assert at_once({LOW}) == 2
    assert at_once({LOW, common_pb2.Priority.PRIORITY_NORMAL}) == 3
    assert at_once({LOW, common_pb2.Priority.PRIORITY_NORMAL, HIGH}) <= 4
