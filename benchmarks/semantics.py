"""Benchmark of task semantics, against the suite `make run` started (gateway 50051).

Measures, with a tenant of its own and the demo `echo` function:
1. timer lateness under light load: DELAYED tasks created at 10/s, each due 2 to 12 s later;
   lateness is the QUEUED stage time (put on Kafka) and the RUNNING stage time, each minus
   the task's schedule_time — p50/p95/p99/max;
2. batch cancel: CANCELLED tasks (scheduled an hour ahead) cancelled by one
   BatchCancelTasks; its duration and rate.
Figures go to ``bench-results/semantics.json``. Sizes: WEIR_BENCH_DELAYED (200),
WEIR_BENCH_CANCELLED (5000).
"""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2
from weir.v1 import tasks_pb2

from benchmarks.common import GATEWAY, bench_tenant, header, percentiles, save
from libs import config as weir_config
from libs.cassandra.session import close, connect
from libs.cassandra.taskstate import FINAL_STATES, TaskKey, TaskStateStore
from libs.sdk import Client

State = tasks_pb2.TaskState


def at(delta: timedelta) -> timestamp_pb2.Timestamp:
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(datetime.now(UTC) + delta)
    return when


def timer_lateness(client: Client, store: TaskStateStore, tenant_id: str, count: int) -> dict:
    rng = random.Random(1)
    ids = []
    for _ in range(count):
        ids.append(client.create_task("echo", b"t", schedule_time=at(
            timedelta(seconds=rng.uniform(2, 12)))).task_id)
        time.sleep(0.1)
    deadline = time.monotonic() + 120
    while True:
        found = store.get_many(TaskKey(tenant_id, i) for i in ids)
        if all(s is not None and s.state in FINAL_STATES for s in found):
            break
        if time.monotonic() > deadline:
            raise TimeoutError("delayed tasks not done after 120s")
        time.sleep(1)
    queued, running = [], []
    for item in found:
        assert item is not None  # the wait above saw every task
        due = item.spec.task.schedule_time.ToNanoseconds() / 1e9
        stages = {s.state: s.time.ToNanoseconds() / 1e9 for s in item.stages()}
        queued.append((stages[State.TASK_STATE_QUEUED] - due) * 1000)
        running.append((stages[State.TASK_STATE_RUNNING] - due) * 1000)
    return {"tasks": count, "created_per_second": 10,
            "due_to_queued_ms": percentiles(queued) | {"max": round(max(queued), 1),
                                                         "min": round(min(queued), 1)},
            "due_to_running_ms": percentiles(running) | {"max": round(max(running), 1)}}


def batch_cancel(client: Client, count: int) -> dict:
    for start in range(0, count, 1000):
        client.create_tasks({"function": "echo", "schedule_time": at(timedelta(hours=1))}
                            for _ in range(min(1000, count - start)))
    began = time.monotonic()
    operation = client.batch_cancel_tasks('function = "echo" AND state = TASK_STATE_SCHEDULED')
    operation = client.wait_operation(operation.name, timeout=1800)
    seconds = time.monotonic() - began
    return {"tasks": count, "processed": operation.processed_count,
            "seconds": round(seconds, 1), "per_second": round(operation.processed_count / seconds)}


def main() -> None:
    config = weir_config.load()
    session = connect(config)
    tenant_id, api_key = bench_tenant(session)
    store = TaskStateStore(session)
    result = header()
    try:
        with Client(GATEWAY, api_key=api_key, timeout=120) as client:
            result["timer_lateness"] = timer_lateness(
                client, store, tenant_id, int(os.environ.get("WEIR_BENCH_DELAYED", "200")))
            print("timers:", result["timer_lateness"], flush=True)
            result["batch_cancel"] = batch_cancel(
                client, int(os.environ.get("WEIR_BENCH_CANCELLED", "5000")))
            print("batch cancel:", result["batch_cancel"], flush=True)
    finally:
        close(session)
    save("semantics", result)


if __name__ == "__main__":
    main()
