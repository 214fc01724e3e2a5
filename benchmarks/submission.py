"""Benchmark of the gateway's submission path: BatchCreateTasks of 1,000 tasks, in process.

``python -m benchmarks.submission`` (engines up; never part of the tests). Drives the
gateway's own `Submitter` on the real Cassandra and Kafka, in a scratch keyspace and topic,
the way the BatchCreateTasks handler does: the request parsed from bytes, validated,
submitted, the response built and serialized (only gRPC's transport is left out). Reports
submissions per second and CPU per task of this process (every thread: the Cassandra
driver's and Kafka producer's IO threads too) and of the two engines' JVMs.

Environment: WEIR_BENCH_BATCHES (40 batches of 1,000), WEIR_BENCH_THREADS (comma-separated
concurrency levels, "1,4"), WEIR_BENCH_PROFILE (a file: cProfile of one run at the first
level, pstats top 40 printed), and the usual WEIR_* engine addresses.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from weir.internal.router.v1 import router_pb2
from weir.v1 import functions_pb2, tasks_pb2

from benchmarks.common import header, save
from benchmarks.cpu import engine_pid, process_cpu_seconds
from libs import config as weir_config
from libs.cache import TtlCache
from libs.cassandra.dedup import DedupStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.listing import TaskListing
from libs.cassandra.migrate import migrate
from libs.cassandra.session import close, connect
from libs.cassandra.submissions import SubmissionStore
from libs.cassandra.taskstate import TaskStateStore
from libs.kafka.client import Producer
from libs.kafka.topics import TopicSpec, ensure_topics
from services.gateway import validation
from services.gateway.engine import Submitter

BATCH = 1000
PAYLOAD = b"x" * 100


def request_bytes(tenant: int) -> bytes:
    """A BatchCreateTasksRequest of 1,000 small tasks, as it arrives on the wire."""
    return tasks_pb2.BatchCreateTasksRequest(requests=[
        tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(
            function="echo", payload=PAYLOAD, labels={"bench": str(tenant)}))
        for _ in range(BATCH)]).SerializeToString()


def main() -> None:
    batches = int(os.environ.get("WEIR_BENCH_BATCHES", "40"))
    levels = [int(n) for n in os.environ.get("WEIR_BENCH_THREADS", "1,4").split(",")]
    profile_to = os.environ.get("WEIR_BENCH_PROFILE", "")
    base = weir_config.load()
    config = replace(base, keyspace=f"bench_submit_{uuid.uuid4().hex[:8]}")
    admin = connect(config, keyspace="")
    migrate(admin, keyspace=config.keyspace, replication_factor=1)
    topic = f"bench-submit-{uuid.uuid4().hex[:8]}.tasks.normal"
    ensure_topics(bootstrap=config.kafka_bootstrap,
                  specs=[TopicSpec(topic, config.task_partitions)], replication_factor=1)
    session = connect(config)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="bench-submission")
    tenant = "bench"
    functions = FunctionStore(session)
    functions.create(tenant, functions_pb2.Function(name="echo", handler="examples.demo:echo"))
    shard = list(range(config.shard_size))  # a (tenant, function)'s k partitions

    def route(tenant_id: str, function: str, priority: int) -> router_pb2.Route:
        return router_pb2.Route(topic=topic, partitions=shard)

    submitter = Submitter(tasks=TaskStateStore(session), listing=TaskListing(session),
                          submissions=SubmissionStore(session),
                          functions=TtlCache(functions.get, ttl=5), dedup=DedupStore(session),
                          route=route, producer=producer)
    wire = request_bytes(0)

    def one_call() -> None:
        """What the BatchCreateTasks handler does, gRPC transport aside."""
        request = tasks_pb2.BatchCreateTasksRequest.FromString(wire)
        validation.check_batch(request, max_payload_bytes=config.max_payload_bytes,
                               allow_private_targets=False)
        created = submitter.create(tenant, list(request.requests),
                                   prefix=lambda i: f"requests[{i}].")
        tasks_pb2.BatchCreateTasksResponse(results=[
            tasks_pb2.BatchCreateTaskResult(task=c.task, status=c.status)
            for c in created]).SerializeToString()

    engines = {name: engine_pid(name, port) for name, port in (
        ("cassandra", config.cassandra_port),
        ("kafka", int(config.kafka_bootstrap.rsplit(":", 1)[1])))}
    for _ in range(3):
        one_call()  # warm: prepared statements, metadata, connections
    results = []
    try:
        for threads in levels:
            if profile_to and threads == levels[0]:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(5):
                    one_call()
                profiler.disable()
                profiler.dump_stats(profile_to)
                pstats.Stats(profile_to).sort_stats("tottime").print_stats(40)
            engine_before = {n: process_cpu_seconds(p) for n, p in engines.items()}
            cpu, wall = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(lambda _: one_call(), range(batches)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            tasks = batches * BATCH
            result = {
                "threads": threads, "tasks": tasks,
                "submissions_per_second": round(tasks / wall),
                "gateway_cpu_us_per_task": round(cpu / tasks * 1e6, 1),
                **{f"{n}_cpu_us_per_task": round(
                    (process_cpu_seconds(p) - engine_before[n]) / tasks * 1e6, 1)
                   for n, p in engines.items()},
                "wall_ms_per_batch": round(wall / batches * 1000 * threads, 1),
            }
            results.append(result)
            print(result, flush=True)
    finally:
        producer.close()
        close(session)
        admin.execute(f"DROP KEYSPACE IF EXISTS {config.keyspace}", timeout=120)
        close(admin)
    save("submission", {**header(), "batch": BATCH, "payload_bytes": len(PAYLOAD),
                        "shard_size": config.shard_size, "results": results})


if __name__ == "__main__":
    main()
