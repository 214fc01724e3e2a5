"""A task's whole life across the five services, as processes, on real Kafka and Cassandra."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from weir.v1 import common_pb2, tasks_pb2

from libs import errors
from libs.cassandra.taskstate import TaskKey, TaskStateStore
from tests.helpers import eventually

State = tasks_pb2.TaskState


def test_a_task_runs_and_its_timeline_shows_every_stage_in_order(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        created = client.create_task("echo", b"hello", labels={"case": "timeline"})
        assert created.state == State.TASK_STATE_QUEUED
        done = client.wait(created.task_id, timeout=60)
    assert done.state == State.TASK_STATE_SUCCEEDED
    assert done.result == b"hello"
    assert [s.state for s in done.stages] == [
        State.TASK_STATE_ACCEPTED, State.TASK_STATE_QUEUED, State.TASK_STATE_DISPATCHED,
        State.TASK_STATE_RUNNING, State.TASK_STATE_SUCCEEDED]
    assert [s.service for s in done.stages] == [
        "gateway", "gateway", "dispatcher", "executor-manager", "executor-manager"]
    times = [s.time.ToDatetime() for s in done.stages]
    assert times == sorted(times)
    assert len(done.attempts) == 1 and done.attempts[0].exit_reason == \
        tasks_pb2.ExitReason.EXIT_REASON_RETURNED
    attempt = done.attempts[0]
    assert attempt.dispatch_time.ToDatetime() <= attempt.start_time.ToDatetime() <= \
        attempt.end_time.ToDatetime()


def test_a_failing_handler_ends_the_task_failed_with_its_error(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        done = client.wait(client.create_task("fail", b"bad input").task_id, timeout=60)
    assert done.state == State.TASK_STATE_FAILED
    assert done.last_status.message == "bad input"
    assert done.attempts[0].exit_reason == tasks_pb2.ExitReason.EXIT_REASON_RAISED


def test_a_thousand_tasks_from_three_tenants_each_succeed_exactly_once(suite, cassandra,
                                                                        tenant_factory):
    tenants = [tenant_factory() for _ in range(3)]
    expected: dict[tuple[str, str], bytes] = {}

    def submit(tenant_index: int) -> None:
        tenant_id, api_key = tenants[tenant_index]
        rng = random.Random(tenant_index)
        with suite.client(api_key) as client:
            batch = [{"function": "echo", "payload": f"{tenant_id}-b{i}".encode()}
                     for i in range(300)]
            for result, task in zip(client.create_tasks(batch), batch, strict=True):
                assert result.status.code == 0
                expected[(tenant_id, result.task.task_id)] = task["payload"]
            singles = 34 if tenant_index < 2 else 32
            for i in range(singles):
                payload = f"{tenant_id}-s{i}-{rng.random()}".encode()
                expected[(tenant_id, client.create_task("echo", payload).task_id)] = payload

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(submit, range(3)))
    assert len(expected) == 1000

    store = TaskStateStore(cassandra)
    keys = list(expected)

    def all_finished():
        stored = store.get_many(TaskKey(*k) for k in keys)
        unfinished = [s for s in stored if s.state != State.TASK_STATE_SUCCEEDED]
        assert not unfinished, f"{len(unfinished)} not yet succeeded"
        return stored

    stored = eventually(all_finished, timeout=240, interval=1.0, message="1,000 tasks done")
    for key, item in zip(keys, stored, strict=True):
        assert item.result == expected[key]
        successes = [a for a in item.attempts()
                     if a.exit_reason == tasks_pb2.ExitReason.EXIT_REASON_RETURNED]
        assert len(successes) == 1


def test_watch_streams_a_running_tasks_states_in_order(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        task = client.create_task("sleep", b"500")
        states = [change.stage.state for change in client.watch(task.task_id, timeout=60)]
    assert states == [State.TASK_STATE_ACCEPTED, State.TASK_STATE_QUEUED,
                      State.TASK_STATE_DISPATCHED, State.TASK_STATE_RUNNING,
                      State.TASK_STATE_SUCCEEDED]


def test_list_tasks_pages_newest_first_and_filters(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        ids = [client.create_task("echo", str(i).encode()).task_id for i in range(5)]
        failed = client.create_task("fail", b"x").task_id
        client.wait(failed, timeout=60)
        listed = [t.task_id for t in client.list_tasks(page_size=2)]
        assert listed[:6] == [failed, *reversed(ids)]
        only_failed = [t.task_id for t in client.list_tasks('state = TASK_STATE_FAILED')]
        assert only_failed == [failed]
        only_fail_fn = [t.task_id for t in client.list_tasks('function = "fail"')]
        assert only_fail_fn == [failed]
        with pytest.raises(errors.InvalidArgument) as raised:
            list(client.list_tasks("colour = blue"))
        assert "filter" in raised.value.violations


def test_another_tenant_sees_nothing_of_a_tenants_tasks_or_functions(suite, tenant,
                                                                     tenant_factory):
    _, key_a = tenant
    _, key_b = tenant_factory()
    with suite.client(key_a) as a, suite.client(key_b) as b:
        task = a.create_task("echo", b"private")
        with pytest.raises(errors.NotFound):
            b.get_task(task.task_id)
        with pytest.raises(errors.NotFound):
            list(b.watch(task.task_id, timeout=10))
        assert task.task_id not in {t.task_id for t in b.list_tasks()}
        a.create_function("secret-fn", "examples.demo:echo")
        with pytest.raises(errors.NotFound):
            b.get_function("secret-fn")
        # B's own function of the same name is B's: names are per tenant.
        b.create_function("secret-fn", "examples.demo:fail")
        assert a.get_function("secret-fn").handler == "examples.demo:echo"


def test_a_repeated_task_id_is_already_exists_with_the_existing_id(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        first = client.create_task("echo", b"once", task_id="order-17")
        with pytest.raises(errors.AlreadyExists) as raised:
            client.create_task("echo", b"twice", task_id="order-17")
        assert raised.value.metadata == {"task_id": "order-17"}
        assert client.wait(first.task_id, timeout=60).result == b"once"



def test_a_functions_concurrency_limit_keeps_its_attempts_apart(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        client.create_function("one-at-a-time", "examples.demo:sleep", rate_limits=
                               common_pb2.RateLimits(max_concurrent_dispatches=1))
        ids = [client.create_task("one-at-a-time", b"300").task_id for _ in range(4)]
        done = [client.wait(i, timeout=60) for i in ids]
    assert all(t.state == State.TASK_STATE_SUCCEEDED for t in done)
    spans = sorted((a.start_time.ToNanoseconds(), a.end_time.ToNanoseconds())
                   for t in done for a in t.attempts)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:],
                                                                       strict=False))


def test_get_function_shows_the_values_applied_to_unset_fields(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        client.create_function("plain", "examples.demo:echo",
                               retry_config=common_pb2.RetryConfig(max_attempts=5))
        shown = client.get_function("plain")
        assert shown.timeout.ToTimedelta() == timedelta(seconds=60)
        assert shown.default_priority == common_pb2.Priority.PRIORITY_NORMAL
        assert shown.worker_concurrency == 1
        assert shown.dedup_window.ToTimedelta() == timedelta(hours=24)
        assert shown.retry_config.max_attempts == 5  # as set
        assert shown.retry_config.min_backoff.ToTimedelta() == timedelta(seconds=1)
        assert shown.retry_config.max_doublings == 16
        # the priority shown is the one a task without its own gets
        task = client.create_task("plain", b"x")
        assert task.priority == shown.default_priority
