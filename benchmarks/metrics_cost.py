"""What the metrics cost per task: ``python -m benchmarks.metrics_cost`` (no engines needed).

Times (best of 5 repeats, timeit) the prometheus_client primitives and the updates Weir makes
on its task path — the gateway's count of a submission, the dispatcher's at each dispatch
(counter and queue-time histogram, under the owner's lock) and of each flushed outcome (on the
flusher's thread) — on registries of their own; then the owner's whole path for a task (take,
dispatch, report, collect, flushed, outcomes counted) with and without metrics, A/B
interleaved. docs/metrics.md quotes the figures.
"""

from __future__ import annotations

import functools
import itertools
import time
import timeit
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram
from weir.internal.dispatcher.v1 import dispatcher_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import functions_pb2, tasks_pb2

from libs.cassandra.owners import Ownership
from libs.cassandra.taskstate import timestamp_of
from libs.metrics import TENANT_LABELS, TIME_BUCKETS, PerTenant, TenantLabels
from services.dispatcher.metrics import DispatcherMetrics
from services.dispatcher.owner import Owner, RecordAck
from services.gateway.metrics import GatewayMetrics

State = tasks_pb2.TaskState
PARTITION = ("weir.tasks.normal", 3)
ECHO = functions_pb2.Function(name="echo", handler="examples.demo:echo",
                              state=functions_pb2.FunctionState.FUNCTION_STATE_ACTIVE)


def best(statement: Callable[[], object], number: int) -> float:
    """Seconds per call, best of 5."""
    return min(timeit.repeat(statement, number=number, repeat=5)) / number


def primitives() -> list[tuple[str, float]]:
    registry = CollectorRegistry()
    counter = Counter("weir_c_total", "c", TENANT_LABELS, registry=registry)
    histogram = Histogram("weir_h_seconds", "h", TENANT_LABELS, buckets=TIME_BUCKETS,
                          registry=registry)
    child, hchild = counter.labels("t", "f"), histogram.labels("t", "f")
    cached = PerTenant(TenantLabels(200), counter, histogram)
    full = TenantLabels(1)
    full("t", "f")
    n = 200_000
    return [
        ("counter.labels(t, f).inc()  (uncached)", best(lambda: counter.labels("t", "f").inc(), n)),
        ("child.inc()  (a child at hand)", best(child.inc, n)),
        ("histogram.labels(t, f).observe(x)  (uncached)",
         best(lambda: histogram.labels("t", "f").observe(0.003), n)),
        ("child.observe(x)", best(lambda: hchild.observe(0.003), n)),
        ("PerTenant.of(t, f)  (cached lookup)", best(lambda: cached.of("t", "f"), n)),
        ("TenantLabels(t, f) past the cap  (-> other)", best(lambda: full("u", "g"), n)),
    ]


def hot_path() -> list[tuple[str, float]]:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(labels=TenantLabels(200), registry=registry)
    gateway = GatewayMetrics(labels=TenantLabels(200), registry=registry)
    results = []
    results.append(("dispatcher: dispatched(t, f, waited)  (per dispatch)",
                    best(lambda: dispatcher.dispatched("t", "echo", 0.004), 100_000)))
    for size in (1, 50):
        outcomes = []
        for i in range(size):
            outcome = records_pb2.AttemptOutcome(tenant_id="t", function="echo",
                                                 state=State.TASK_STATE_SUCCEEDED)
            outcome.attempt.start_time.FromNanoseconds(1_000_000_000 + i)
            outcome.attempt.end_time.FromNanoseconds(1_003_000_000 + i)
            outcomes.append(outcome)
        per_batch = best(functools.partial(dispatcher.outcomes, outcomes), 20_000 // size)
        results.append((f"dispatcher: outcomes(batch of {size}), per task", per_batch / size))
    for size in (1, 100):
        specs = [records_pb2.TaskSpec(tenant_id="t", task=tasks_pb2.Task(function="echo"))
                 for _ in range(size)]
        per_batch = best(functools.partial(gateway.accepted, specs), 20_000 // size)
        results.append((f"gateway: accepted(batch of {size}), per task", per_batch / size))
    return results


def owner_path(metrics: DispatcherMetrics | None, tasks: int, ids: itertools.count) -> float:
    """Seconds per task through an owner: taken, dispatched, reported done, flushed."""
    owner = Owner(lease=timedelta(seconds=30), dispatcher_id="d1", metrics=metrics)
    now = int(datetime.now(UTC).timestamp() * 1e6)
    owner.own(Ownership(*PARTITION, epoch=2, range_start=now, range_end=now + 600_000_000,
                        timer_minute=None), replay_below=0)
    owner.adopted(PARTITION)
    created = timestamp_of(datetime.now(UTC))
    messages = [records_pb2.TaskMessage(tenant_id="t", task_id=f"task-{next(ids)}",
                                        function="echo", payload=b"p", attempt_number=1,
                                        create_time=created) for _ in range(tasks)]
    stamp = timestamp_of(datetime.now(UTC))
    owner.connect(1, "em-1", lambda: None)
    began = time.process_time()  # CPU: the machine may be busy with other work
    for message in messages:
        owner.take(PARTITION, message, ECHO, RecordAck(lambda: None, 1))
    owner.work(1, dispatcher_pb2.WorkRequest(executor_id="em-1", credits=tasks))
    response = owner.next_response(1)
    sent = list(response.assignments) if response else []
    while len(sent) < tasks:
        response = owner.next_response(1)
        assert response is not None
        sent += response.assignments
    owner.work(1, dispatcher_pb2.WorkRequest(reports=[dispatcher_pb2.AttemptReport(
        attempt_id=a.attempt_id, topic=a.topic, partition=a.partition, start_time=stamp,
        end_time=stamp, result=b"r") for a in sent]))
    outcomes = owner.flushed(owner.collect())
    if metrics is not None:
        metrics.outcomes(outcomes)
    assert len(outcomes) == tasks
    return (time.process_time() - began) / tasks


def owner_ab(rounds: int = 15, tasks: int = 2000) -> tuple[float, float]:
    metrics = DispatcherMetrics(labels=TenantLabels(200), registry=CollectorRegistry())
    ids = itertools.count()
    without, with_ = [], []
    owner_path(metrics, 200, ids)  # warm
    owner_path(None, 200, ids)
    for _ in range(rounds):
        without.append(owner_path(None, tasks, ids))
        with_.append(owner_path(metrics, tasks, ids))
    return min(without), min(with_)


def main() -> None:
    print("per call (best of 5 repeats):")
    for name, seconds in primitives() + hot_path():
        print(f"  {seconds * 1e9:8.0f} ns  {name}")
    without, with_ = owner_ab()
    print(f"owner path per task (take → dispatch → report → flush; best of 15 rounds of 2,000): "
          f"without metrics {without * 1e6:.1f} µs, with {with_ * 1e6:.1f} µs "
          f"(+{(with_ - without) * 1e6:.1f} µs, {100 * (with_ - without) / without:+.1f} %)")


if __name__ == "__main__":
    main()
