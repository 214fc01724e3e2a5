"""Benchmark of the whole pipeline, against the suite `make run` started (gateway 50051).

Measures, with a tenant of its own and the demo `echo` function:
1. durable submission rate through BatchCreateTasks (batches of 1,000, 4 client threads);
2. end-to-end throughput: a backlog of BACKLOG echo tasks submitted, then timed until every
   one SUCCEEDED;
3. submit→start latency (RUNNING stage time minus the client's send time) p50/p95/p99 at a
   steady RATE tasks/s for SECONDS seconds;
4. resource use of each process (CPU per task, peak memory) over the backlog and the steady run.
Figures go to ``bench-results/pipeline.json``. Sizes: WEIR_BENCH_BACKLOG (20000; the
submission rate is measured on the same tasks), WEIR_BENCH_RATE (200), WEIR_BENCH_SECONDS (20).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from weir.v1 import tasks_pb2

from benchmarks.common import GATEWAY, bench_tenant, header, percentiles, save
from benchmarks.resources import ResourceMeter
from libs import config as weir_config
from libs.cassandra.session import close, connect
from libs.cassandra.tasks import TaskKey, TaskStore
from libs.sdk import Client

SUCCEEDED = tasks_pb2.TaskState.TASK_STATE_SUCCEEDED


def wait_all(store: TaskStore, tenant_id: str, ids: list[str], *, timeout: float) -> float:
    """Seconds until every task SUCCEEDED (checked every second); raises on timeout."""
    began = time.monotonic()
    pending = list(ids)
    while pending:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{len(pending)} tasks not done after {timeout:.0f}s")
        time.sleep(1)
        stored = store.get_many(TaskKey(tenant_id, i) for i in pending)
        pending = [i for i, s in zip(pending, stored, strict=True)
                   if s is None or s.state != SUCCEEDED]
    return time.monotonic() - began


def submit(client: Client, count: int, threads: int = 4) -> tuple[list[str], float]:
    batches = [[{"function": "echo", "payload": b"b"}] * min(1000, count - start)
               for start in range(0, count, 1000)]
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(client.create_tasks, batches))
    seconds = time.monotonic() - began
    return [r.task.task_id for batch in results for r in batch], seconds


def steady_latency(client: Client, store: TaskStore, tenant_id: str, *, rate: float,
                   seconds: float) -> dict:
    sent: dict[str, float] = {}
    lock = threading.Lock()
    interval = 1.0 / rate
    began = time.time()

    def one(at: float) -> None:
        time.sleep(max(0.0, at - time.time()))
        stamp = time.time()
        task = client.create_task("echo", b"l")
        with lock:
            sent[task.task_id] = stamp

    with ThreadPoolExecutor(max_workers=64) as pool:
        for n in range(int(rate * seconds)):
            pool.submit(one, began + n * interval)
    wait_all(store, tenant_id, list(sent), timeout=600)
    latencies = []
    for task_id, stamp in sent.items():
        stages = store.stages(tenant_id, task_id)
        start = next(s for s in stages if s.state == tasks_pb2.TaskState.TASK_STATE_RUNNING)
        latencies.append((start.time.ToNanoseconds() / 1e9 - stamp) * 1000)
    achieved = len(sent) / (max(sent.values()) - began) if sent else 0.0
    return {"target_rate": rate, "achieved_submit_rate": round(achieved, 1),
            "submit_to_start": percentiles(latencies)}


def main() -> None:
    config = weir_config.load()
    session = connect(config)
    tenant_id, api_key = bench_tenant(session)
    store = TaskStore(session, service="bench")
    backlog = int(os.environ.get("WEIR_BENCH_BACKLOG", "20000"))
    result = header()
    try:
        with Client(GATEWAY, api_key=api_key, timeout=120) as client:
            # The submissions are the backlog: timed first as accepted, then as drained.
            began = time.monotonic()
            with ResourceMeter() as backlog_use:
                ids, seconds = submit(client, backlog)
                result["durable_submissions"] = {"tasks": len(ids),
                                                 "seconds": round(seconds, 2),
                                                 "per_second": round(len(ids) / seconds)}
                print("submission:", result["durable_submissions"], flush=True)
                wait_all(store, tenant_id, ids, timeout=3600)
            drained = time.monotonic() - began
            result["backlog_throughput"] = {"tasks": backlog, "seconds": round(drained, 1),
                                            "per_second": round(backlog / drained, 1)}
            result["backlog_resources"] = backlog_use.report(tasks=backlog)
            print("backlog:", result["backlog_throughput"], flush=True)

            with ResourceMeter() as steady_use:
                result["steady"] = steady_latency(
                    client, store, tenant_id,
                    rate=float(os.environ.get("WEIR_BENCH_RATE", "200")),
                    seconds=float(os.environ.get("WEIR_BENCH_SECONDS", "20")))
            result["steady_resources"] = steady_use.report(
                tasks=result["steady"]["submit_to_start"]["count"])
            print("steady:", result["steady"], flush=True)
    finally:
        close(session)
    save("pipeline", result)


if __name__ == "__main__":
    main()


