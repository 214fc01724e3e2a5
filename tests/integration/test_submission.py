"""The gateway's task path on the real engines: a submission stored and produced one record per
partition, the sweeper re-producing what a crash left, and control records to the owners."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta

import pytest
from cassandra.cluster import Session
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from weir.internal.router.v1 import router_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs.cache import TtlCache
from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.dedup import DedupStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.listing import TaskListing
from libs.cassandra.parked import ParkedStore
from libs.cassandra.partition_index import minute_of
from libs.cassandra.submissions import SubmissionStore
from libs.cassandra.taskstate import (
    DELETE_AHEAD,
    StoredTask,
    TaskKey,
    TaskStateStore,
    TaskWrite,
    micros,
    now_utc,
    timestamp_of,
)
from libs.config import WeirConfig
from libs.errors import Unavailable
from libs.kafka.client import Producer, Record
from libs.kafka.topics import TopicSpec, ensure_topics
from libs.taskqueue import message_of, messages_of
from services.gateway.control import ScanPosition, TaskControl, scan_tasks
from services.gateway.engine import Submitter
from services.gateway.filters import TaskFilter
from services.gateway.sweeper import SubmissionSweeper
from tests.helpers import eventually, unique

State = tasks_pb2.TaskState
Kind = records_pb2.MessageKind
PARTITIONS = 4
TARGET = common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(url="https://hooks.test/w"))


class FailingProducer(Producer):
    """A producer whose Kafka is unreachable: what a gateway sees when it cannot queue."""

    def __init__(self) -> None:  # no client: nothing is ever sent
        pass

    def send_all(self, records: Iterable[Record], *, timeout_seconds: float = 10.0) -> None:
        list(records)
        raise KafkaError("the broker is unreachable")


@dataclass
class Gateway:
    """The gateway's engines on the real stores, routing every task to ``topic``."""

    tenant_id: str
    topic: str
    tasks: TaskStateStore
    listing: TaskListing
    submissions: SubmissionStore
    dead_letters: DeadLetterStore
    parked: ParkedStore
    producer: Producer
    make_submitter: Callable[[Producer], Submitter]
    config: WeirConfig

    @property
    def submitter(self) -> Submitter:
        return self.make_submitter(self.producer)

    def control(self, *, cancel_wait_seconds: float = 5.0) -> TaskControl:
        return TaskControl(tasks=self.tasks, listing=self.listing,
                           dead_letters=self.dead_letters, parked=self.parked,
                           functions=FunctionStore(self.tasks._session),
                           dedup=DedupStore(self.tasks._session), producer=self.producer,
                           cancel_wait_seconds=cancel_wait_seconds)

    def sweeper(self) -> SubmissionSweeper:
        return SubmissionSweeper(submissions=self.submissions, tasks=self.tasks,
                                 producer=self.producer, grace=timedelta(seconds=1))

    def create(self, requests: list[tasks_pb2.CreateTaskRequest], *,
               submitter: Submitter | None = None) -> list[tasks_pb2.Task]:
        created = (submitter or self.submitter).create(self.tenant_id, requests,
                                                       prefix=lambda i: f"requests[{i}].")
        assert all(c.status.code == code_pb2.OK for c in created)
        return [c.task for c in created]

    def stored(self, task_ids: list[str]) -> list[StoredTask]:
        found = self.tasks.get_many(TaskKey(self.tenant_id, i) for i in task_ids)
        assert None not in found
        return found  # type: ignore[return-value]

    def records(self) -> dict[int, list[list[records_pb2.TaskMessage]]]:
        """Every record of the topic so far, by partition, each as its messages."""
        consumer = KafkaConsumer(bootstrap_servers=self.config.kafka_bootstrap.split(","),
                                 enable_auto_commit=False, group_id=None)
        try:
            partitions = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            ends = consumer.end_offsets(partitions)
            found: dict[int, list[list[records_pb2.TaskMessage]]] = {
                p: [] for p in range(PARTITIONS)}

            def read_to_the_end() -> bool:
                for tp, batch in consumer.poll(timeout_ms=500).items():
                    found[tp.partition] += [messages_of(r.value) for r in batch]
                return all(consumer.position(tp) >= ends[tp] for tp in partitions)

            eventually(read_to_the_end, timeout=30, message="the topic read to its end")
            return found
        finally:
            consumer.close()


@pytest.fixture
def gateway(suite_config: WeirConfig, cassandra: Session) -> Iterator[Gateway]:
    """A fresh tenant with the function ``echo``, and a topic of its own: records read back
    are this test's alone, and no running dispatcher takes them."""
    topic = unique("submission").replace("_", "-") + ".tasks.normal"
    ensure_topics(bootstrap=suite_config.kafka_bootstrap,
                  specs=[TopicSpec(topic, PARTITIONS)], replication_factor=1)
    tenant_id = unique("tenant")
    functions = FunctionStore(cassandra)
    functions.create(tenant_id, functions_pb2.Function(name="echo", handler="examples.demo:echo"))
    tasks, listing = TaskStateStore(cassandra), TaskListing(cassandra)
    submissions = SubmissionStore(cassandra)
    producer = Producer(bootstrap=suite_config.kafka_bootstrap, client_id="test-submission")

    def route(tenant: str, function: str, priority: int) -> router_pb2.Route:
        return router_pb2.Route(tenant_id=tenant, function=function, topic=topic,
                                partitions=range(PARTITIONS))

    def make_submitter(with_producer: Producer) -> Submitter:
        return Submitter(tasks=tasks, listing=listing, submissions=submissions,
                         functions=TtlCache(functions.get, ttl=5), dedup=DedupStore(cassandra),
                         route=route, producer=with_producer)

    yield Gateway(tenant_id, topic, tasks, listing, submissions, DeadLetterStore(cassandra),
                  ParkedStore(cassandra), producer, make_submitter, suite_config)
    producer.close()


def create_requests(count: int) -> list[tasks_pb2.CreateTaskRequest]:
    return [tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(
        function="echo", payload=f"payload {i}".encode(), labels={"n": str(i)}))
        for i in range(count)]


def in_seconds(seconds: float) -> Timestamp:
    return timestamp_of(now_utc() + timedelta(seconds=seconds))


def owner_writes(gateway: Gateway, stored: StoredTask, state: int, **status: object) -> None:
    """What the partition's owner would write: a new state, a moment after creation."""
    created = micros(stored.spec.task.create_time.ToDatetime(tzinfo=UTC))
    gateway.tasks.write(TaskWrite(
        key=stored.key, state=state,
        status=records_pb2.TaskStatus(update_time=timestamp_of(now_utc()), **status),
        history=records_pb2.TaskHistory(stages=[tasks_pb2.TaskStage(
            state=state, time=timestamp_of(now_utc()), service="dispatcher")]),
        timestamp=created + 1000)).result()


def test_a_batch_of_a_thousand_tasks_is_stored_and_queued_in_one_record_per_partition(
        gateway):
    created = gateway.create(create_requests(1000))
    assert {t.state for t in created} == {State.TASK_STATE_QUEUED}
    ids = [t.task_id for t in created]

    records = gateway.records()
    assert all(len(records[p]) == 1 for p in range(PARTITIONS)), \
        {p: len(r) for p, r in records.items()}
    messages = {m.task_id: (p, m) for p in records for m in records[p][0]}
    assert Counter(m.task_id for p in records for m in records[p][0]) == Counter(ids)

    stored = gateway.stored(ids)
    for i, task in enumerate(stored):
        spec = task.spec
        partition, message = messages[spec.task.task_id]
        assert task.state == State.TASK_STATE_QUEUED
        assert [(s.state, s.service) for s in task.stages()] == [
            (State.TASK_STATE_ACCEPTED, "gateway"), (State.TASK_STATE_QUEUED, "gateway")]
        assert task.status.attempt_count == 0
        assert (spec.tenant_id, spec.topic, spec.partition) == \
            (gateway.tenant_id, gateway.topic, partition)
        assert spec.task.payload == f"payload {i}".encode()
        assert spec.task.labels == {"n": str(i)}
        assert spec.task.priority == common_pb2.Priority.PRIORITY_NORMAL
        assert not spec.client_task_id and not spec.task.HasField("schedule_time")
        assert (message.tenant_id, message.function, message.payload, message.priority,
                message.attempt_number, message.kind, message.check_state) == (
            gateway.tenant_id, "echo", spec.task.payload, spec.task.priority, 1,
            Kind.MESSAGE_KIND_UNSPECIFIED, False)
        assert message.create_time == spec.task.create_time
        assert message.labels == {"n": str(i)}

    created_at = stored[0].spec.task.create_time.ToDatetime(tzinfo=UTC)
    listed = gateway.listing.page(gateway.tenant_id, day=created_at.date(),
                                  before=created_at, after_task_id="", limit=2000)
    assert sorted(task_id for _, task_id in listed) == sorted(ids)
    eventually(lambda: not [k for _, keys in gateway.submissions.unconfirmed(
        minute_of(created_at)) for k in keys if k.tenant_id == gateway.tenant_id],
        message="the submission confirmed")


def test_a_delayed_task_waits_scheduled_and_its_record_carries_the_schedule(gateway):
    [task] = gateway.create([tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(
        function="echo", task_id=unique("later"), schedule_time=in_seconds(60),
        max_age=Duration(seconds=3600), priority=common_pb2.Priority.PRIORITY_HIGH,
        retry_config=common_pb2.RetryConfig(max_attempts=3), result_targets=[TARGET]))])
    assert task.state == State.TASK_STATE_SCHEDULED
    [stored] = gateway.stored([task.task_id])
    assert stored.state == State.TASK_STATE_SCHEDULED
    assert [s.state for s in stored.stages()] == [State.TASK_STATE_ACCEPTED,
                                                  State.TASK_STATE_SCHEDULED]
    spec = stored.spec
    assert spec.client_task_id and spec.task.priority == common_pb2.Priority.PRIORITY_HIGH
    assert spec.task.expire_time.ToDatetime() - spec.task.create_time.ToDatetime() == \
        timedelta(hours=1)
    [[message]] = gateway.records()[spec.partition]
    assert message.schedule_time == spec.task.schedule_time
    assert message.expire_time == spec.task.expire_time
    assert spec.task.retry_config.max_attempts == message.retry_config.max_attempts == 3
    assert list(spec.task.result_targets) == list(message.result_targets) == [TARGET]


def test_tasks_stored_but_never_produced_are_queued_by_the_sweeper_for_their_owner_to_check(
        gateway):
    with pytest.raises(Unavailable):
        gateway.create(create_requests(40),
                       submitter=gateway.make_submitter(FailingProducer()))
    ids = [t.spec.task.task_id for t in _tenant_tasks(gateway)]
    assert len(ids) == 40
    assert not any(gateway.records().values())
    started = gateway.stored(ids)[0]
    owner_writes(gateway, started, State.TASK_STATE_DISPATCHED, attempt_count=1)

    minute = minute_of(started.spec.task.create_time.ToDatetime(tzinfo=UTC))
    gateway.sweeper().sweep_minute(minute)

    records = gateway.records()
    produced = [m for p in records for record in records[p] for m in record]
    assert all(len(records[p]) <= 1 for p in records)
    # Every task once, except the one its owner already started.
    assert Counter(m.task_id for m in produced) == Counter(
        i for i in ids if i != started.spec.task.task_id)
    assert all(m.check_state and m.attempt_number == 1 for m in produced)
    assert not [k for _, keys in gateway.submissions.unconfirmed(minute) for k in keys
                if k.tenant_id == gateway.tenant_id]
    gateway.sweeper().sweep_minute(minute)  # confirmed now: a second sweep adds nothing
    assert sum(len(r) for r in gateway.records().values()) == len(
        [p for p in records if records[p]])


def _tenant_tasks(gateway: Gateway) -> list[StoredTask]:
    """Every task of the gateway's tenant created today, through the listing."""
    today = now_utc()
    rows = gateway.listing.page(gateway.tenant_id, day=today.date(),
                                before=today + timedelta(hours=1), after_task_id="",
                                limit=10_000)
    return gateway.stored([task_id for _, task_id in rows])


def test_a_cancel_is_a_record_to_the_owner_and_returns_the_task_once_it_ended(gateway):
    [task] = gateway.create(create_requests(1))
    [queued] = gateway.stored([task.task_id])
    owner_writes(gateway, queued, State.TASK_STATE_CANCELLED)  # as the owner will, on receipt

    after = gateway.control().cancel(queued, reason="no longer needed")

    assert after.state == State.TASK_STATE_CANCELLED
    record = gateway.records()[queued.spec.partition][-1]
    assert [(m.kind, m.tenant_id, m.task_id, m.reason, m.payload) for m in record] == [
        (Kind.MESSAGE_KIND_CANCEL, gateway.tenant_id, task.task_id, "no longer needed", b"")]


def test_a_cancel_the_owner_does_not_answer_returns_the_task_as_it_is_after_the_wait(gateway):
    [task] = gateway.create(create_requests(1))
    [queued] = gateway.stored([task.task_id])
    control = gateway.control(cancel_wait_seconds=0.2)
    assert control.cancel(queued, reason="r").state == State.TASK_STATE_QUEUED
    assert control.request_cancel(queued, reason="r")  # a batch item: done once asked
    kinds = [m.kind for r in gateway.records()[queued.spec.partition] for m in r]
    assert kinds == [Kind.MESSAGE_KIND_UNSPECIFIED] + [Kind.MESSAGE_KIND_CANCEL] * 2


def test_a_redrive_is_a_checked_record_with_the_new_payload_and_the_dead_letter_goes(gateway):
    [task] = gateway.create(create_requests(1))
    [queued] = gateway.stored([task.task_id])
    owner_writes(gateway, queued, State.TASK_STATE_FAILED, attempt_count=3,
                 last_status=status_pb2.Status(code=code_pb2.INTERNAL, message="boom"))
    [failed] = gateway.stored([task.task_id])
    gateway.dead_letters.put(failed, when=now_utc())
    letter = gateway.dead_letters.get(gateway.tenant_id, task.task_id)
    assert (letter.payload, letter.last_status.message) == (b"payload 0", "boom")

    assert gateway.control().redrive(gateway.tenant_id, letter, payload_override=b"fixed")

    [message] = gateway.records()[queued.spec.partition][-1]
    assert (message.kind, message.check_state, message.attempt_number, message.payload,
            message.payload_override) == (Kind.MESSAGE_KIND_REDRIVE, True, 4, b"fixed", b"fixed")
    assert gateway.dead_letters.get(gateway.tenant_id, task.task_id) is None


def test_resuming_releases_parked_tasks_as_checked_records_and_unparks_them(gateway):
    created = gateway.create(create_requests(3))
    stored = gateway.stored([t.task_id for t in created])
    for task in stored:
        gateway.parked.park(message_of(task.spec, attempt_number=1))
    owner_writes(gateway, stored[2], State.TASK_STATE_CANCELLED)  # cancelled while held

    assert gateway.control().release_parked(gateway.tenant_id, "echo") == 2

    released = [m for records in gateway.records().values() for r in records for m in r
                if m.check_state]
    assert sorted(m.task_id for m in released) == sorted(t.task_id for t in created[:2])
    assert list(gateway.parked.parked(gateway.tenant_id, "echo")) == []


def test_deleting_a_task_removes_it_its_listing_and_its_dead_letter(gateway):
    [task] = gateway.create(create_requests(1))
    [queued] = gateway.stored([task.task_id])
    owner_writes(gateway, queued, State.TASK_STATE_FAILED)
    [failed] = gateway.stored([task.task_id])
    gateway.dead_letters.put(failed, when=now_utc())

    assert gateway.control().delete(failed)

    assert gateway.tasks.get(failed.key) is None
    assert gateway.dead_letters.get(gateway.tenant_id, task.task_id) is None
    assert _tenant_tasks(gateway) == []


def test_a_listing_scan_reads_the_tasks_newest_first_and_stops_at_its_budget(gateway):
    created = gateway.create(create_requests(30))
    ids = {t.task_id for t in created}
    everything = [(position, stored) for position, stored in scan_tasks(
        gateway.tasks, gateway.listing, gateway.tenant_id, TaskFilter.parse(""),
        ScanPosition.start(), batch=7)]
    assert {s.spec.task.task_id for _, s in everything if s} == ids
    one = TaskFilter.parse('labels.n = "3" AND state = TASK_STATE_QUEUED')
    [(_, match)] = list(scan_tasks(gateway.tasks, gateway.listing, gateway.tenant_id, one,
                                   ScanPosition.start(), batch=7, history=True))
    assert match.spec.task.labels["n"] == "3" and len(match.stages()) == 2
    bounded = list(scan_tasks(gateway.tasks, gateway.listing, gateway.tenant_id,
                              TaskFilter.parse('labels.n = "none"'), ScanPosition.start(),
                              batch=7, budget=10))
    assert [stored for _, stored in bounded] == [None]  # the position reached, for a token
    after = bounded[0][0]
    rest = [s for _, s in scan_tasks(gateway.tasks, gateway.listing, gateway.tenant_id,
                                     TaskFilter.parse(""), after, batch=7) if s]
    assert len(rest) == 20  # the scan resumes right after the ten it read


def test_dead_letters_page_newest_first_without_gaps(cassandra):
    letters = DeadLetterStore(cassandra)
    tenant = unique("t")
    when = now_utc()
    for i in range(7):
        failed = StoredTask(spec=records_pb2.TaskSpec(tenant_id=tenant, task=tasks_pb2.Task(
            task_id=f"dl-{i}", function="f")), state=State.TASK_STATE_FAILED,
            status=records_pb2.TaskStatus())
        letters.put(failed, when=when if i < 5 else when - timedelta(minutes=i))
    seen, after = [], None
    while page := letters.page(tenant, after=after, limit=3):
        seen += [row.task_id for row in page]
        after = (page[-1].dead_letter_time, page[-1].task_id)
    assert seen == ["dl-0", "dl-1", "dl-2", "dl-3", "dl-4", "dl-5", "dl-6"]


def test_a_client_id_past_its_window_is_still_refused_while_its_task_exists(gateway):
    request = tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(task_id=unique("id"),
                                                              function="echo"))
    gateway.create([request])
    dedup = DedupStore(gateway.tasks._session)
    # Its window is over:
    assert dedup.release(gateway.tenant_id, request.task.task_id, request.task.task_id)
    [again] = gateway.submitter.create(gateway.tenant_id, [request], prefix=lambda i: "")
    assert again.status.code == code_pb2.ALREADY_EXISTS


def test_a_deleted_tasks_id_stays_taken_while_the_deletion_would_hide_a_new_task(gateway):
    request = tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(task_id=unique("id"),
                                                              function="echo"))
    [task] = gateway.create([request])
    dedup, session = DedupStore(gateway.tasks._session), gateway.tasks._session
    dedup.release(gateway.tenant_id, task.task_id, task.task_id)  # its window is over
    [queued] = gateway.stored([task.task_id])
    owner_writes(gateway, queued, State.TASK_STATE_SUCCEEDED)
    [stored] = gateway.stored([task.task_id])
    assert gateway.control().delete(stored)
    row = session.execute("SELECT task_id, TTL(task_id) AS ttl FROM dedup_keys "
                          "WHERE tenant_id = %s AND dedup_key = %s",
                          (gateway.tenant_id, task.task_id)).one()
    assert row.task_id == task.task_id and row.ttl > DELETE_AHEAD.total_seconds() - 60
    [again] = gateway.submitter.create(gateway.tenant_id, [request], prefix=lambda i: "")
    assert again.status.code == code_pb2.ALREADY_EXISTS
