"""Task state changes on the real database: compare-and-set, fencing, timers, listings."""

from __future__ import annotations

import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from google.rpc import code_pb2, status_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.tasks import TaskStore, now_utc, timestamp_of
from libs.cassandra.timers import MINUTE, Timer, TimerStore, minute_of, to_millis
from libs.kafka.client import Producer
from libs.kafka.topics import ensure_topics, task_topic, weir_topics
from libs.lifecycle import Lifecycle
from libs.retry import RetryPolicy
from tests.helpers import unique

State = tasks_pb2.TaskState


@pytest.fixture(scope="module")
def topic_prefix(suite_config) -> str:
    """Topics of this module's own: the suite's dispatchers must not lease its tasks."""
    own = dataclasses.replace(suite_config, topic_prefix=unique("lifecycle").replace("_", "-"),
                              task_partitions=1)
    ensure_topics(bootstrap=own.kafka_bootstrap, specs=weir_topics(own), replication_factor=1)
    return own.topic_prefix


@pytest.fixture(scope="module")
def lifecycle(suite_config, cassandra, topic_prefix):
    producer = Producer(bootstrap=suite_config.kafka_bootstrap, client_id="test-lifecycle")
    yield Lifecycle.of_service(cassandra, producer, service="test", topic_prefix=topic_prefix)
    producer.close()


def new_task(store: TaskStore, tenant: str, *, count: int = 1,
             topic: str = "") -> list[records_pb2.TaskRecord]:
    """Stored tasks, marked queued (never produced): the suite's sweepers, which share this
    keyspace, leave them alone."""
    now = now_utc()
    records = [records_pb2.TaskRecord(tenant_id=tenant, topic=topic, task=tasks_pb2.Task(
        task_id=unique("task"), function="f", state=State.TASK_STATE_ACCEPTED,
        create_time=timestamp_of(now), update_time=timestamp_of(now))) for _ in range(count)]
    store.create(records)
    store.mark_queued(records, queued_time=now, record_stage=False)
    return records


def test_concurrent_transitions_of_one_task_let_exactly_one_win(cassandra):
    store = TaskStore(cassandra, service="test")
    tenant = unique("t")
    [record] = new_task(store, tenant)
    read = [store.get(tenant, record.task.task_id) for _ in range(8)]
    targets = [State.TASK_STATE_CANCELLED, State.TASK_STATE_EXPIRED] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        won = list(pool.map(lambda pair: store.transition(pair[0], state=pair[1]),
                            zip(read, targets, strict=True)))
    assert sum(won) == 1
    final = store.get(tenant, record.task.task_id)
    assert final.state == targets[won.index(True)]
    assert [s.state for s in store.stages(tenant, record.task.task_id)].count(final.state) == 1


def test_a_late_result_under_a_lost_lease_is_rejected(topic_prefix, lifecycle):
    store = lifecycle.tasks
    tenant = unique("t")
    [record] = new_task(store, tenant, topic=task_topic(topic_prefix, "normal"))
    task_id = record.task.task_id
    zombie, successor = uuid.uuid4(), uuid.uuid4()
    expire = now_utc() + timedelta(seconds=30)
    assert store.lease(tenant, task_id, lease_id=zombie, expire_time=expire, attempt_number=1)
    # The zombie's lease is swept (its attempt ends LEASE_LOST) and the task leased again.
    swept = store.get(tenant, task_id)
    lost = tasks_pb2.Attempt(attempt_number=1, status=status_pb2.Status(code=code_pb2.UNAVAILABLE),
                             exit_reason=tasks_pb2.ExitReason.EXIT_REASON_LEASE_LOST,
                             end_time=timestamp_of(now_utc()))
    # A long backoff: the suite's timer poller must not queue the task before this test does.
    policy = RetryPolicy(min_backoff=timedelta(minutes=5))
    assert lifecycle.end_attempt(swept.record, lost, lease_id=zombie, policy=policy) == \
        State.TASK_STATE_RETRY_WAIT
    waiting = store.get(tenant, task_id)
    assert lifecycle.queue(waiting, detail="due", ready=lambda s: True)
    assert store.lease(tenant, task_id, lease_id=successor, expire_time=expire,
                       attempt_number=2)
    done = tasks_pb2.Attempt(attempt_number=2, status=status_pb2.Status(code=code_pb2.OK),
                             start_time=timestamp_of(now_utc()), end_time=timestamp_of(now_utc()))
    late = store.get(tenant, task_id).record
    assert lifecycle.end_attempt(late, done, lease_id=zombie, policy=policy,
                                 result=b"zombie") is None
    current = store.get(tenant, task_id).record
    assert lifecycle.end_attempt(current, done, lease_id=successor, policy=policy,
                                 result=b"ok") == State.TASK_STATE_SUCCEEDED
    final = store.get(tenant, task_id).record.task
    assert final.result == b"ok" and len(final.attempts) == 2
    assert [s.state for s in store.stages(tenant, task_id)].count(State.TASK_STATE_SUCCEEDED) == 1


def test_timers_are_read_by_minute_until_a_time_and_deleted_once_fired(cassandra):
    timers = TimerStore(cassandra)
    tenant = unique("t")
    base = minute_of(now_utc()) + timedelta(minutes=5)
    due = [Timer(tenant, f"task-{i}", to_millis(base + timedelta(seconds=10 * i)), 1)
           for i in range(3)]
    timers.add(due)
    mine = [t for t in timers.due(due[0].shard, base, until=base + timedelta(seconds=15))
            if t.tenant_id == tenant and t.shard == due[0].shard]
    assert {t.task_id for t in mine} <= {"task-0", "task-1"}
    for timer in due:
        timers.delete(timer)
    assert not [t for t in timers.due(due[0].shard, base, until=base + MINUTE)
                if t.tenant_id == tenant]
    # The shard cursors are left alone: they are global to the keyspace, which the suite's
    # dispatcher shares (the restart test in e2e exercises them).


def test_listings_page_through_tasks_created_at_the_same_instant(cassandra):
    store = TaskStore(cassandra, service="test")
    tenant = unique("t")
    records = new_task(store, tenant, count=25)
    created = records[0].task.create_time.ToDatetime(tzinfo=UTC)
    seen, before, after = [], datetime.max.replace(tzinfo=UTC), ""
    while True:
        page = store.list_page(tenant, day=created.date(), before=before, after_task_id=after,
                               limit=10)
        if not page:
            break
        seen += [task_id for _, task_id in page]
        before, after = page[-1][0].replace(tzinfo=UTC), page[-1][1]
    assert sorted(seen) == sorted(r.task.task_id for r in records)


def test_dead_letters_page_newest_first_without_gaps(cassandra):
    letters = DeadLetterStore(cassandra)
    tenant = unique("t")
    when = now_utc()
    for i in range(7):
        record = records_pb2.TaskRecord(tenant_id=tenant, task=tasks_pb2.Task(
            task_id=f"dl-{i}", function="f"))
        letters.put(record, when=when if i < 5 else when - timedelta(minutes=i))
    seen, after = [], None
    while page := letters.page(tenant, after=after, limit=3):
        seen += [row.task_id for row in page]
        after = (page[-1].dead_letter_time, page[-1].task_id)
    assert seen == ["dl-0", "dl-1", "dl-2", "dl-3", "dl-4", "dl-5", "dl-6"]
