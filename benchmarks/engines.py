"""Benchmark of the foundation: what Weir's Kafka and Cassandra layers do on this machine.

Run with ``make bench`` (engines up). Measures, through Weir's own libs:
- Kafka: durable produce rate (acks=all, batches of 1,000 records of 200 bytes), and
  consume rate with per-message acks and tracker commits;
- Cassandra: latency of single task-sized writes, and of dedup claims (LWT), sequential and
  under 16 concurrent claimants.
Writes JSON to ``bench-results/engines.json`` and prints a table.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from benchmarks.common import header, percentiles, save
from libs import config as weir_config
from libs.cassandra.dedup import DedupStore
from libs.cassandra.migrate import migrate
from libs.cassandra.session import close, connect
from libs.kafka.client import Consumer, Producer, Record
from libs.kafka.topics import TopicSpec, ensure_topics


def bench_kafka(config: weir_config.WeirConfig, records: int = 50_000) -> dict:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap=config.kafka_bootstrap, specs=[TopicSpec(topic, 4)],
                  replication_factor=1)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="bench")
    payload = os.urandom(200)
    began = time.perf_counter()
    for start in range(0, records, 1000):
        producer.send_all(Record(topic, payload, key=str(i).encode())
                          for i in range(start, start + 1000))
    produce_seconds = time.perf_counter() - began
    producer.close()

    consumer = Consumer(bootstrap=config.kafka_bootstrap, group_id=f"bench-{topic}",
                        topics=[topic], client_id="bench")
    consumed = 0
    began = time.perf_counter()
    deadline = began + 120
    while consumed < records and time.perf_counter() < deadline:
        for message in consumer.poll(0.5):
            message.ack()
            consumed += 1
        consumer.commit()
    consume_seconds = time.perf_counter() - began
    consumer.close()
    return {"records": records, "record_bytes": len(payload),
            "produce_per_second": round(records / produce_seconds),
            "consumed": consumed,
            "consume_ack_commit_per_second": round(consumed / consume_seconds)}


def bench_cassandra(config: weir_config.WeirConfig, operations: int = 2_000) -> dict:
    keyspace = f"bench_{uuid.uuid4().hex[:8]}"
    session = connect(config, keyspace="")
    try:
        migrate(session, keyspace=keyspace, replication_factor=1)
        # A task's creation as the gateway writes it: spec, state and status statics plus
        # its first history row.
        insert = session.prepare(
            "INSERT INTO task_state (tenant_id, task_id, seq, spec, state, status, history) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)")
        spec, status, history = os.urandom(400), os.urandom(40), os.urandom(80)
        writes = []
        for i in range(operations):
            seq = int(datetime.now(UTC).timestamp() * 1_000_000)
            began = time.perf_counter()
            session.execute(insert, ("bench", f"t{i}", seq, spec, 2, status, history))
            writes.append((time.perf_counter() - began) * 1000)

        dedup = DedupStore(session)
        claims = []
        for i in range(operations // 2):
            began = time.perf_counter()
            dedup.claim("bench", f"k{i}", f"t{i}", window=timedelta(hours=1))
            claims.append((time.perf_counter() - began) * 1000)

        contended = []

        def claim(i: int) -> None:
            began = time.perf_counter()
            dedup.claim("bench", f"hot{i // 16}", f"t{i}", window=timedelta(hours=1))
            contended.append((time.perf_counter() - began) * 1000)

        began_all = time.perf_counter()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(claim, range(operations // 2)))
        contended_seconds = time.perf_counter() - began_all
        return {"task_write": percentiles(writes), "dedup_claim": percentiles(claims),
                "dedup_claim_16_concurrent_on_shared_keys": {
                    **percentiles(contended),
                    "per_second": round(len(contended) / contended_seconds)}}
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        close(session)


def main() -> None:
    config = weir_config.load()
    result = {**header(), "kafka": bench_kafka(config), "cassandra": bench_cassandra(config)}
    save("engines", result)


if __name__ == "__main__":
    main()
