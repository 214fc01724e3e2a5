"""Benchmark of flow control, on a suite of its own: two dispatchers and two
executor-managers (tests/suite.py) against the local engines, in a fresh keyspace.

Run in the order 2, 4, 3, 1 (each drains before the next; 1 leaves its LOW backlog).

1. priorities: LOW's share of dispatches while HIGH saturates the executors; HIGH's
   submit→start p99 on an idle suite and with WEIR_BENCH_LOW_BACKLOG (100,000) LOW tasks
   queued;
2. a function limited to 50/s with WEIR_BENCH_RATE_TASKS (5,000) queued: starts per 1 s
   window; a function capped at 8 at once: the most out at once, from the attempt records;
3. AIMD against a downstream that throttles above 40 calls/s, which rises to 80/s after
   `AIMD_SECONDS`: when the rate settles within 10 % of 40, its mean and the THROTTLED share
   afterwards, and where it is once the cap is 80;
4. noisy neighbour: B and C create single tasks at 50/s each, for `NOISY_SECONDS`, without
   and then with A submitting 20 times as much, first with A kept on its shared partitions,
   then with the router moving it to partitions of its own: submit→start p99 of B and C,
   who the gateway refused (RESOURCE_EXHAUSTED), and A's route.
Figures go to ``bench-results/flow.json``. Shorter runs: WEIR_BENCH_AIMD_SECONDS (90),
WEIR_BENCH_NOISY_SECONDS (30); some parts only: WEIR_BENCH_FLOW_PARTS (e.g. ``noisy,aimd``).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cassandra.cluster import Session
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import common_pb2

from benchmarks.common import header, percentiles, save
from libs import config as weir_config
from libs.cassandra.functions import FunctionStore
from libs.cassandra.migrate import migrate
from libs.cassandra.session import close, connect
from libs.cassandra.taskstate import FINAL_STATES, StoredTask, TaskKey, TaskStateStore
from libs.cassandra.tenants import TenantStore
from libs.errors import ResourceExhausted
from libs.kafka.topics import ensure_topics, weir_topics
from libs.sdk import Client
from services.gateway.admin import ensure_demo_functions
from tests.flow import ThrottlingDownstream, most_at_once, split_across_owners, two_of_each
from tests.helpers import unique
from tests.suite import Suite

HIGH, LOW = common_pb2.Priority.PRIORITY_HIGH, common_pb2.Priority.PRIORITY_LOW
THROTTLED = common_pb2.ErrorClass.ERROR_CLASS_THROTTLED
AIMD_SECONDS = int(os.environ.get("WEIR_BENCH_AIMD_SECONDS", "90"))
NOISY_SECONDS = int(os.environ.get("WEIR_BENCH_NOISY_SECONDS", "30"))
ALL_PARTS = "limits,noisy,aimd,priorities"
PARTS = os.environ.get("WEIR_BENCH_FLOW_PARTS", ALL_PARTS).split(",")


def tenant(session: Session) -> tuple[str, str]:
    tenants = TenantStore(session)
    created, _ = tenants.create_tenant(unique("flow"))
    ensure_demo_functions(FunctionStore(session), created.tenant_id)
    return created.tenant_id, tenants.issue_api_key(created.tenant_id)


def wait_done(store: TaskStateStore, tenant_id: str, ids: list[str], *, timeout: float
              ) -> list[StoredTask]:
    deadline = time.monotonic() + timeout
    while True:
        stored: list[StoredTask | None] = []
        for start in range(0, len(ids), 500):
            stored += store.get_many(TaskKey(tenant_id, i) for i in ids[start:start + 500])
        if all(s is not None and s.state in FINAL_STATES for s in stored):
            return [s for s in stored if s is not None]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids)} tasks not done after {timeout}s")
        time.sleep(1)


def start_delay_ms(task: StoredTask) -> float:
    first = task.attempts()[0]
    return (first.start_time.ToNanoseconds() - task.spec.task.create_time.ToNanoseconds()) / 1e6


def dispatch_delay_ms(task: StoredTask) -> float:
    """Submit to dispatch: the part of the start delay spent before an executor had it."""
    first = task.attempts()[0]
    return (first.dispatch_time.ToNanoseconds()
            - task.spec.task.create_time.ToNanoseconds()) / 1e6


def paced(count: int, per_second: float, create: Callable[[], str]) -> list[str]:
    ids, began = [], time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, began + n / per_second - time.monotonic()))
        ids.append(create())
    return ids


def priorities(suite: Suite, session: Session, store: TaskStateStore, backlog: int) -> dict:
    tenant_id, api_key = tenant(session)
    result: dict = {}
    with Client(suite.address("gateway"), api_key=api_key, timeout=120) as client:
        def high_p99() -> dict:
            ids = paced(200, 20, lambda: client.create_task(
                "sleep", b"20", priority=HIGH).task_id)
            done = wait_done(store, tenant_id, ids, timeout=300)
            return percentiles([start_delay_ms(t) for t in done]) | {
                "submit_to_dispatch_p99_ms": percentiles(
                    [dispatch_delay_ms(t) for t in done])["p99_ms"]}
        result["high_submit_to_start_idle"] = high_p99()

        # HIGH saturating the executors (64 slots) with LOW waiting too: LOW's share.
        tiers = [LOW if n % 5 == 0 else HIGH for n in range(5000)]
        created = client.create_tasks({"function": "sleep", "payload": b"200", "priority": t}
                                      for t in tiers)
        done = wait_done(store, tenant_id, [r.task.task_id for r in created], timeout=600)
        dispatched = sorted((s.attempts()[0].dispatch_time.ToNanoseconds(),
                             s.spec.task.priority == LOW) for s in done)
        high = [t for t, is_low in dispatched if not is_low]
        during = [is_low for t, is_low in dispatched if high[0] <= t <= high[-1]]
        result["low_share_while_high_saturates"] = {
            "tasks": len(tiers), "dispatched_while_high_waited": len(during),
            "low_share": round(sum(during) / len(during), 3), "configured_min_share": 0.1}

        # A deep LOW backlog (each expires after the measurement, not to be drained).
        began = time.monotonic()
        for _ in range(0, backlog, 1000):
            client.create_tasks({"function": "sleep", "payload": b"100", "priority": LOW,
                                 "max_age": {"seconds": 900}} for _ in range(1000))
        result["low_backlog"] = {"tasks": backlog,
                                 "submit_seconds": round(time.monotonic() - began, 1)}
        result["high_submit_to_start_with_low_backlog"] = high_p99()
        idle = result["high_submit_to_start_idle"]["p99_ms"]
        loaded = result["high_submit_to_start_with_low_backlog"]["p99_ms"]
        result["high_p99_ratio"] = round(loaded / idle, 2)
    print("priorities:", result, flush=True)
    return result


def windows(times_ns: list[int]) -> list[int]:
    """Starts per 1 s window from the first."""
    counts = Counter((t - times_ns[0]) // 1_000_000_000 for t in times_ns)
    return [counts.get(w, 0) for w in range(max(counts) + 1)]


def limits(suite: Suite, session: Session, store: TaskStateStore, tasks: int) -> dict:
    tenant_id, api_key = tenant(session)
    topic = f"{suite.config.topic_prefix}.tasks.normal"
    rate_name, cap_name = (split_across_owners(session, tenant_id, topic,
                                               suite.config.task_partitions, prefix)
                           for prefix in ("paced", "capped"))
    with Client(suite.address("gateway"), api_key=api_key, timeout=120) as client:
        client.create_function(rate_name, "examples.demo:sleep", worker_concurrency=8,
                               rate_limits={"max_dispatches_per_second": 50,
                                            "max_burst_size": 50})
        client.create_function(cap_name, "examples.demo:sleep", worker_concurrency=8,
                               rate_limits={"max_concurrent_dispatches": 8})
        rate_ids, cap_ids = [], []
        for start in range(0, tasks, 1000):
            rate_ids += [r.task.task_id for r in client.create_tasks(
                {"function": rate_name, "payload": b"10"}
                for _ in range(min(1000, tasks - start)))]
        cap_ids = [r.task.task_id for r in client.create_tasks(
            {"function": cap_name, "payload": b"100"} for _ in range(400))]
    done = wait_done(store, tenant_id, rate_ids + cap_ids, timeout=tasks / 50 * 2 + 120)
    by_id = {t.key.task_id: t for t in done}
    per_window = windows(sorted(by_id[i].attempts()[0].dispatch_time.ToNanoseconds()
                                for i in rate_ids))
    full = per_window[1:-1]  # after the first, before the last (partial) one
    executors = Counter(a.executor_id for t in done for a in t.attempts())
    result = {
        "rate_limit": {"limit_per_second": 50, "tasks": tasks, "windows": len(full),
                       "min": min(full), "max": max(full),
                       "mean": round(sum(full) / len(full), 2),
                       "outside_45_55": sum(1 for c in full if not 45 <= c <= 55)},
        "concurrency_cap": {"cap": 8, "tasks": 400, "most_at_once": most_at_once([
            (a.dispatch_time.ToNanoseconds(), a.end_time.ToNanoseconds())
            for i in cap_ids for a in by_id[i].attempts()])},
        "attempts_by_executor": dict(executors)}
    print("limits:", result, flush=True)
    return result


def aimd(suite: Suite, session: Session, store: TaskStateStore) -> dict:
    tenant_id, api_key = tenant(session)
    # A downstream serving 40 calls a second, with a tenth of a second's burst.
    with ThrottlingDownstream(per_second=40, burst=4) as downstream, \
            Client(suite.address("gateway"), api_key=api_key, timeout=120) as client:
        client.create_function(
            "caller", "tests.handlers:downstream", worker_concurrency=16,
            retry_config={"max_attempts": 100, "throttled_min_backoff": {"seconds": 1}},
            rate_limits={"max_dispatches_per_second": 200, "adaptive": {"enabled": True}})
        ids = []
        for _ in range(12):
            ids += [r.task.task_id for r in client.create_tasks(
                {"function": "caller", "payload": downstream.url.encode()}
                for _ in range(1000))]
        began = time.monotonic()
        rates: list[float] = []
        while time.monotonic() - began < 2 * AIMD_SECONDS:
            if len(rates) == AIMD_SECONDS:
                downstream.set_rate(80)  # (its burst stays 4)
            rates.append(client.get_function("caller").adaptive_rate_state
                         .current_dispatches_per_second)
            time.sleep(max(0.0, began + len(rates) - time.monotonic()))
        calls = list(downstream.calls)
        # The rest is cancelled, and gone, before the next figures are taken.
        client.wait_operation(client.batch_cancel_tasks('function = "caller"').name,
                              timeout=900)
        wait_done(store, tenant_id, ids, timeout=900)
    # Settled: from then on, every 10 s mean of the rate is within 10 % of 40 (AIMD saws
    # around its target: each decrease takes a tenth off).
    means = [sum(rates[n:n + 10]) / 10 for n in range(AIMD_SECONDS - 9)]
    settled = next((n for n in range(len(means)) if all(36 <= m <= 44 for m in means[n:])),
                   None)
    since = AIMD_SECONDS if settled is None else settled  # (0: settled from the start)
    after = [(t, ok) for t, ok in calls if began + since <= t < began + AIMD_SECONDS]
    served = [ok for t, ok in calls if began + AIMD_SECONDS - 30 <= t < began + AIMD_SECONDS]
    result = {
        "downstream_cap_per_second": 40, "ceiling": 200,
        "seconds_to_settle_10s_means_within_10_percent": settled,
        "rate_after_settling": {"mean": round(sum(rates[settled or 0:AIMD_SECONDS])
                                              / max(1, AIMD_SECONDS - (settled or 0)), 1),
                                "min": min(rates[settled or 0:AIMD_SECONDS]),
                                "max": max(rates[settled or 0:AIMD_SECONDS])},
        "calls_served_per_second_last_30s": round(sum(served) / min(30, AIMD_SECONDS), 1),
        "throttled_share_after_settling": round(
            sum(1 for _, ok in after if not ok) / max(1, len(after)), 3),
        "cap_raised_to": 80,
        "rate_30s_after_raise": rates[AIMD_SECONDS + 30] if len(rates) > AIMD_SECONDS + 30
        else None,
        "rate_at_end": rates[-1], "rates_by_second": [round(r, 1) for r in rates]}
    print("aimd:", {k: v for k, v in result.items() if k != "rates_by_second"}, flush=True)
    return result


def noisy_neighbour(suite: Suite, session: Session, store: TaskStateStore) -> dict:
    tenants = {name: tenant(session) for name in ("a", "b", "c")}
    clients = {name: Client(suite.address("gateway"), api_key=key, timeout=60)
               for name, (_, key) in tenants.items()}

    def run(with_a: bool) -> dict:
        refused: Counter[str] = Counter()
        ids: dict[str, list[str]] = {"a": [], "b": [], "c": []}
        stop = threading.Event()

        def steady(name: str) -> None:
            def create() -> str:
                try:
                    return clients[name].create_task("echo", b"x").task_id
                except ResourceExhausted:
                    refused[name] += 1
                    return ""
            ids[name] += [i for i in paced(50 * NOISY_SECONDS, 50, create) if i]

        def flood() -> None:
            while not stop.is_set():  # 20 times B's rate: 1,000 a second, in batches
                began = time.monotonic()
                try:
                    ids["a"] += [r.task.task_id for r in clients["a"].create_tasks(
                        {"function": "echo"} for _ in range(100))]
                except ResourceExhausted:
                    refused["a"] += 100
                time.sleep(max(0.0, began + 0.1 - time.monotonic()))

        threads = [threading.Thread(target=steady, args=(n,)) for n in ("b", "c")]
        if with_a:
            threads.append(threading.Thread(target=flood))
        for thread in threads:
            thread.start()
        for thread in threads[:2]:
            thread.join()
        stop.set()
        for thread in threads[2:]:
            thread.join()
        figures: dict = {"refused_tasks": dict(refused), "a_accepted": len(ids["a"])}
        wait_done(store, tenants["a"][0], ids["a"], timeout=900)  # drained before the next
        for name in ("b", "c"):
            done = wait_done(store, tenants[name][0], ids[name], timeout=600)
            figures[f"{name}_submit_to_start"] = percentiles([start_delay_ms(t) for t in done])
        return figures

    try:
        result = {"without_a": run(False)}
        # A stays on its shared partitions (no move), then is moved to partitions of its own
        # (the router's defaults: a backlog of 1,000 held for 10 s).
        restart_with(suite, "router", WEIR_HOT_TENANT_BACKLOG=str(10**9))
        result["with_a_not_moved"] = run(True)
        restart_with(suite, "router")
        result["with_a_moved"] = run(True)
        with suite.internal_channel("router", identity="gateway") as channel:
            routes = router_pb2_grpc.RouterServiceStub(channel).ListRoutes(
                router_pb2.ListRoutesRequest(tenant_id=tenants["a"][0]), timeout=10).routes
        result["with_a_moved"]["a_route"] = [
            {"partitions": list(r.partitions), "home": list(r.home_partitions),
             "reason": r.move_reason} for r in routes]
    finally:
        for client in clients.values():
            client.close()
    print("noisy neighbour:", result, flush=True)
    return result


# Deep queues on purpose (5,000 queued for one function, 100,000 LOW), which admission would
# refuse at its defaults.
OPEN_ADMISSION = {"WEIR_ADMISSION_BACKLOG": "10000000",
                  "WEIR_ADMISSION_TENANT_BACKLOG": "10000000"}


def restart_with(suite: Suite, name: str, **env: str) -> None:
    suite.terminate(name)
    suite.restart(name, **env)


def main() -> None:
    config = weir_config.load(keyspace=unique("flow"),
                              topic_prefix=unique("flow").replace("_", "-"))
    session = connect(config, keyspace="")
    migrate(session, keyspace=config.keyspace, replication_factor=1)
    close(session)
    ensure_topics(bootstrap=config.kafka_bootstrap, specs=weir_topics(config),
                  replication_factor=1)
    work = Path(tempfile.mkdtemp(prefix="weir-flow-"))
    suite = Suite(config=config, log_dir=work, credentials_dir=work / "credentials")
    session = connect(config)
    store = TaskStateStore(session)
    result = header() | {"suite": "2 dispatchers, 2 executor-managers (4 workers x 8 slots "
                                  "each), 1 gateway, router, notifier; logs in " + str(work)}
    os.environ.update(OPEN_ADMISSION)
    try:
        suite.start()
        two_of_each(suite, session)
        if "limits" in PARTS:
            result["limits"] = limits(suite, session, store,
                                      int(os.environ.get("WEIR_BENCH_RATE_TASKS", "5000")))
        if "noisy" in PARTS:
            # Admission at its defaults for the noisy neighbour only: the other figures need
            # deeper queues than a tenant is admitted by default.
            restart_with(suite, "gateway", WEIR_ADMISSION_BACKLOG="4000",
                         WEIR_ADMISSION_TENANT_BACKLOG="1500")
            result["noisy_neighbour"] = noisy_neighbour(suite, session, store)
            restart_with(suite, "gateway", **OPEN_ADMISSION)
        if "aimd" in PARTS:
            result["aimd"] = aimd(suite, session, store)
        if "priorities" in PARTS:  # last: its LOW backlog is left to expire
            result["priorities"] = priorities(
                suite, session, store, int(os.environ.get("WEIR_BENCH_LOW_BACKLOG", "100000")))
    finally:
        suite.stop()
        session.execute(f"DROP KEYSPACE IF EXISTS {config.keyspace}", timeout=120)
        close(session)
    everything = PARTS == ALL_PARTS.split(",")  # noqa: SIM300 (reads as it means)
    save("flow" if everything else "flow-" + "-".join(PARTS), result)


if __name__ == "__main__":
    main()
