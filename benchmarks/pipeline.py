"""Benchmark of the whole pipeline, against the suite `make run` started (gateway 50051).

Measures, with a tenant of its own and the demo `echo` function:
1. durable submissions through BatchCreateTasks (batches of 1,000, WEIR_BENCH_THREADS client
   threads, default 4) — the submissions are the backlog of 2.;
2. end-to-end drain: a backlog of WEIR_BENCH_BACKLOG (20,000) echo tasks submitted, then
   timed until every one SUCCEEDED;
3. submit→start latency (RUNNING stage time minus the client's send time) p50/p95/p99 at a
   steady WEIR_BENCH_RATE (200) tasks/s for WEIR_BENCH_SECONDS (20) seconds, one CreateTask
   each;
4. with WEIR_BENCH_DEEP (e.g. 200000): the drain rate while that many tasks are queued,
   against the rate of a backlog of 2,000 measured just before;
5. with WEIR_BENCH_SOAK_SECONDS (e.g. 1800): WEIR_BENCH_SOAK_RATE (300) tasks/s for that long,
   p99 submit→start and each process's memory minute by minute, and Cassandra's log checked
   for tombstone warnings;
6. resource use of each process (CPU per task, peak memory) over 2. and 3.
Completion is watched on the results topic (the outcomes the owners publish), not by reading
tasks, so the benchmark adds no reads to the engines it measures. Figures go to
``bench-results/pipeline.json``.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from benchmarks.common import GATEWAY, bench_tenant, header, percentiles, save
from benchmarks.resources import ResourceMeter, snapshot
from libs import config as weir_config
from libs.cassandra.session import close, connect
from libs.cassandra.taskstate import TaskKey, TaskStateStore
from libs.kafka.topics import results_topic
from libs.sdk import Client

SUCCEEDED = tasks_pb2.TaskState.TASK_STATE_SUCCEEDED
ROOT = Path(__file__).resolve().parent.parent


class Outcomes:
    """Follows the results topic from now on: when each of the tenant's tasks SUCCEEDED."""

    def __init__(self, config: weir_config.WeirConfig, tenant_id: str) -> None:
        self._tenant = tenant_id
        self._consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap.split(","),
                                       enable_auto_commit=False)
        topic = results_topic(config.topic_prefix)
        partitions = [TopicPartition(topic, p)
                      for p in self._consumer.partitions_for_topic(topic)]
        self._consumer.assign(partitions)
        self._consumer.seek_to_end()
        for tp in partitions:
            self._consumer.position(tp)  # resolve the end now: what follows is ours
        self.done: dict[str, float] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            for records in self._consumer.poll(timeout_ms=200).values():
                now = time.monotonic()
                batch = [o for r in records
                         for o in records_pb2.AttemptOutcomeBatch.FromString(r.value).outcomes
                         if o.tenant_id == self._tenant and o.state == SUCCEEDED]
                with self._lock:
                    for outcome in batch:
                        self.done.setdefault(outcome.task_id, now)
                    self._lock.notify_all()

    def wait(self, ids: list[str], *, timeout: float) -> float:
        """Monotonic time when the last of ``ids`` succeeded."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                missing = [i for i in ids if i not in self.done]
                if not missing:
                    return max(self.done[i] for i in ids)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(missing)} of {len(ids)} tasks not done")
                self._lock.wait(1.0)

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)
        self._consumer.close()


def submit(client: Client, count: int, threads: int) -> tuple[list[str], float, float]:
    """Submits ``count`` echo tasks; (ids, monotonic start, seconds)."""
    batches = [[{"function": "echo", "payload": b"b"}] * min(1000, count - start)
               for start in range(0, count, 1000)]
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(client.create_tasks, batches))
    return [r.task.task_id for batch in results for r in batch], began, time.monotonic() - began


def drain(client: Client, outcomes: Outcomes, count: int, threads: int) -> dict:
    ids, began, seconds = submit(client, count, threads)
    last = outcomes.wait(ids, timeout=3600)
    return {"tasks": count, "submit_seconds": round(seconds, 2),
            "submissions_per_second": round(count / seconds),
            "drain_seconds": round(last - began, 1),
            "per_second": round(count / (last - began), 1)}


def steady(client: Client, store: TaskStateStore, outcomes: Outcomes, tenant_id: str, *,
           rate: float, seconds: float) -> dict:
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
    outcomes.wait(list(sent), timeout=600)
    latencies = []
    ids = list(sent)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for task_id, stored in zip(chunk, store.get_many(TaskKey(tenant_id, i) for i in chunk),
                                   strict=True):
            assert stored is not None  # created by the gateway, so stored
            running = next(s for s in stored.stages()
                           if s.state == tasks_pb2.TaskState.TASK_STATE_RUNNING)
            latencies.append((running.time.ToNanoseconds() / 1e9 - sent[task_id]) * 1000)
    achieved = len(sent) / (max(sent.values()) - began) if sent else 0.0
    return {"target_rate": rate, "achieved_submit_rate": round(achieved, 1),
            "submit_to_start": percentiles(latencies)}


def deep_backlog(client: Client, outcomes: Outcomes, depth: int, threads: int) -> dict:
    """The drain rate while ``depth`` tasks wait, against a backlog of 2,000."""
    small = drain(client, outcomes, 2000, threads)
    ids, began, seconds = submit(client, depth, threads)
    outcomes.wait(ids, timeout=7200)
    done = sorted(outcomes.done[i] for i in ids)
    # Completions while at least 90 % of the backlog was still queued.
    deep = [t for n, t in enumerate(done) if depth - n >= 0.9 * depth]
    deep_rate = (len(deep) - 1) / (deep[-1] - deep[0]) if len(deep) > 1 else 0.0
    return {"depth": depth, "submit_seconds": round(seconds, 1),
            "rate_with_2000": small["per_second"],
            "rate_while_90_percent_queued": round(deep_rate, 1),
            "ratio": round(deep_rate / small["per_second"], 3) if small["per_second"] else None,
            "whole_drain_per_second": round(depth / (done[-1] - began), 1)}


def soak(client: Client, store: TaskStateStore, outcomes: Outcomes, tenant_id: str, *,
         rate: float, seconds: float) -> dict:
    """Minute by minute: p99 submit→start and memory; tombstone warnings at the end."""
    minutes = []
    log = ROOT / ".var" / "cassandra" / "logs" / "system.log"
    log_start = log.stat().st_size if log.exists() else 0
    for _ in range(max(1, int(seconds // 60))):
        figures = steady(client, store, outcomes, tenant_id, rate=rate, seconds=60)
        memory = {name: round(u.rss_bytes / 2**20) for name, u in snapshot().items()}
        minutes.append({"p99_ms": figures["submit_to_start"]["p99_ms"],
                        "p50_ms": figures["submit_to_start"]["p50_ms"], "rss_mib": memory})
        print("soak minute:", minutes[-1], flush=True)
    warnings = 0
    if log.exists():
        with log.open() as lines:
            lines.seek(log_start)
            warnings = sum("tombstone" in line.lower() for line in lines)
    return {"rate": rate, "minutes": minutes, "tombstone_warnings": warnings}


def main() -> None:
    config = weir_config.load()
    session = connect(config)
    tenant_id, api_key = bench_tenant(session)
    store = TaskStateStore(session)
    backlog = int(os.environ.get("WEIR_BENCH_BACKLOG", "20000"))
    threads = int(os.environ.get("WEIR_BENCH_THREADS", "4"))
    result = header()
    outcomes = Outcomes(config, tenant_id)
    try:
        with Client(GATEWAY, api_key=api_key, timeout=120) as client:
            with ResourceMeter() as backlog_use:
                result["backlog"] = drain(client, outcomes, backlog, threads)
            result["backlog_resources"] = backlog_use.report(tasks=backlog)
            print("backlog:", result["backlog"], flush=True)

            with ResourceMeter() as steady_use:
                result["steady"] = steady(
                    client, store, outcomes, tenant_id,
                    rate=float(os.environ.get("WEIR_BENCH_RATE", "200")),
                    seconds=float(os.environ.get("WEIR_BENCH_SECONDS", "20")))
            result["steady_resources"] = steady_use.report(
                tasks=result["steady"]["submit_to_start"]["count"])
            print("steady:", result["steady"], flush=True)

            depth = int(os.environ.get("WEIR_BENCH_DEEP", "0"))
            if depth:
                result["deep_backlog"] = deep_backlog(client, outcomes, depth, threads)
                print("deep backlog:", result["deep_backlog"], flush=True)
            soak_seconds = float(os.environ.get("WEIR_BENCH_SOAK_SECONDS", "0"))
            if soak_seconds:
                result["soak"] = soak(
                    client, store, outcomes, tenant_id, seconds=soak_seconds,
                    rate=float(os.environ.get("WEIR_BENCH_SOAK_RATE", "300")))
    finally:
        outcomes.close()
        close(session)
    save("pipeline", result)


if __name__ == "__main__":
    main()
