"""Task semantics across the five services: retries by error class, dedup, delays, expiry,
cancel, pause/resume and dead letters, on real Kafka and Cassandra."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc
from weir.v1 import common_pb2, tasks_pb2

from libs import errors
from libs.cassandra.taskstate import FINAL_STATES as FINAL, TaskKey, TaskStateStore
from tests.helpers import eventually, unique

State = tasks_pb2.TaskState
Exit = tasks_pb2.ExitReason
ErrorClass = common_pb2.ErrorClass


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


def at(timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


def flaky(succeed_on: int, **spec) -> bytes:
    return json.dumps({"succeed_on": succeed_on, **spec}).encode()


def register(client, handler: str, **retry) -> str:
    """A fresh function of ``tests.handlers:<handler>`` with the given retry settings."""
    name = unique(handler).replace("_", "-")
    config = common_pb2.RetryConfig(**{k: seconds(v) if isinstance(v, float) else v
                                       for k, v in retry.items()})
    client.create_function(name, f"tests.handlers:{handler}", retry_config=config)
    return name


def wait(client, task_id: str, *, timeout: float) -> tasks_pb2.Task:
    """The task once final; on a timeout, the failure shows where the task got stuck."""
    try:
        return client.wait(task_id, timeout=timeout)
    except errors.WeirError as exc:
        stuck = client.get_task(task_id)
        raise AssertionError(f"task {task_id} not final within {timeout}s: {exc}; it is "
                             f"{State.Name(stuck.state)} after stages "
                             f"{[State.Name(s.state) for s in stuck.stages]}") from exc


def wait_attempts(client, task_id: str, attempts: int, *, timeout: float) -> tasks_pb2.Task:
    """The task once final after ``attempts`` attempts. A re-driven task's timeline already
    holds its earlier final stage, which a watch would replay first (see issue 12)."""
    return eventually(lambda: (t := client.get_task(task_id)).state in FINAL
                      and len(t.attempts) >= attempts and t, timeout=timeout,
                      message=f"task {task_id} final after {attempts} attempts")


def gaps(task: tasks_pb2.Task) -> list[float]:
    """Seconds from the end of each attempt to the start of the next."""
    attempts = task.attempts
    return [(at(b.start_time) - at(a.end_time)).total_seconds()
            for a, b in zip(attempts, attempts[1:], strict=False)]


# --- retries by error class --------------------------------------------------------------

def test_a_retryable_failure_succeeds_on_attempt_three_after_the_backoff(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "flaky", max_attempts=5, min_backoff=0.5)
        done = wait(client, client.create_task(function, flaky(3)).task_id, timeout=60)
    assert done.state == State.TASK_STATE_SUCCEEDED, done.last_status
    assert done.result == b"succeeded on attempt 3"
    assert [a.exit_reason for a in done.attempts] == [
        Exit.EXIT_REASON_RAISED, Exit.EXIT_REASON_RAISED, Exit.EXIT_REASON_RETURNED]
    assert [a.error_class for a in done.attempts[:2]] == [ErrorClass.ERROR_CLASS_RETRYABLE] * 2
    assert [a.attempt_number for a in done.attempts] == [1, 2, 3]
    first, second = gaps(done)
    print(f"\nbackoff observed: {first:.3f}s then {second:.3f}s (policy 0.5s, 1s; jitter ±20%)")
    assert 0.4 <= first <= 0.6 + 1.5  # 0.5s ± 20%, plus the trip back through Kafka
    assert 0.8 <= second <= 1.2 + 1.5
    assert [s.state for s in done.stages].count(State.TASK_STATE_RETRY_WAIT) == 2


def test_a_non_retryable_failure_fails_after_one_attempt_into_the_dead_letters(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "flaky", max_attempts=5, min_backoff=0.1)
        task = client.create_task(function, flaky(3, error="NON_RETRYABLE"))
        done = wait(client, task.task_id, timeout=60)
        assert done.state == State.TASK_STATE_FAILED
        assert len(done.attempts) == 1
        assert done.attempts[0].error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE
        letter = eventually(lambda: client.get_dead_letter(task.task_id), timeout=10)
    assert letter.payload == flaky(3, error="NON_RETRYABLE")
    assert letter.error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE
    assert len(letter.attempts) == 1 and letter.last_status.message == \
        "attempt 1 fails on purpose"


def test_throttled_failures_back_off_longer_than_retryable_ones(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "flaky", max_attempts=3, min_backoff=0.2,
                            throttled_min_backoff=1.5)
        retryable = client.create_task(function, flaky(2, error="RETRYABLE"))
        throttled = client.create_task(function, flaky(2, error="THROTTLED"))
        retryable = wait(client, retryable.task_id, timeout=60)
        throttled = wait(client, throttled.task_id, timeout=60)
    assert retryable.state == throttled.state == State.TASK_STATE_SUCCEEDED
    assert throttled.attempts[0].error_class == ErrorClass.ERROR_CLASS_THROTTLED
    print(f"\nretryable gap {gaps(retryable)[0]:.3f}s, throttled gap {gaps(throttled)[0]:.3f}s")
    assert gaps(throttled)[0] >= 1.5 * 0.8  # at least its backoff (less the jitter)
    # Longer than the retryable one's (0.2 s): compared, not held to a time, since both
    # gaps also hold the time to dispatch and start the attempt, which load stretches.
    assert gaps(retryable)[0] < gaps(throttled)[0]


def test_a_handler_chooses_its_retry_delay(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "flaky", max_attempts=3, min_backoff=0.1)
        done = wait(client, client.create_task(function, flaky(2, retry_after=2.0)).task_id,
                           timeout=60)
    assert done.state == State.TASK_STATE_SUCCEEDED
    assert done.attempts[0].requested_retry_delay.ToTimedelta() == timedelta(seconds=2)
    assert gaps(done)[0] >= 2.0


def test_exhausted_retries_fail_with_every_attempt_kept(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "flaky", max_attempts=5, min_backoff=0.1)
        # The task overrides the function's policy: two attempts in all.
        task = client.create_task(function, flaky(10),
                                  retry_config=common_pb2.RetryConfig(max_attempts=2))
        done = wait(client, task.task_id, timeout=60)
        letter = eventually(lambda: client.get_dead_letter(task.task_id), timeout=10)
    assert done.state == State.TASK_STATE_FAILED
    assert [a.attempt_number for a in done.attempts] == [1, 2]
    assert "retries exhausted after 2 attempts" in done.stages[-1].detail
    assert len(letter.attempts) == 2


# --- dedup and fencing -------------------------------------------------------------------

def test_a_hundred_concurrent_creates_with_one_task_id_make_one_task(suite, tenant):
    _, api_key = tenant
    task_id = unique("same")

    def create(_):
        with suite.client(api_key) as client:
            try:
                return client.create_task("echo", b"once", task_id=task_id)
            except errors.AlreadyExists as exc:
                return exc

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(create, range(100)))
    created = [o for o in outcomes if isinstance(o, tasks_pb2.Task)]
    refused = [o for o in outcomes if isinstance(o, errors.AlreadyExists)]
    assert len(created) == 1 and len(refused) == 99
    assert all(e.metadata["task_id"] == task_id for e in refused)
    with suite.client(api_key) as client:
        assert wait(client, task_id, timeout=60).state == State.TASK_STATE_SUCCEEDED
        assert [t.task_id for t in client.list_tasks() if t.task_id == task_id] == [task_id]
        # The ID stays claimed after the task finished (the dedup window outlives it).
        with pytest.raises(errors.AlreadyExists):
            client.create_task("echo", b"again", task_id=task_id)


def test_a_zombie_executors_late_result_is_rejected(suite, cassandra, tenant):
    """An executor frozen mid-attempt (SIGSTOP) loses its lease; the task runs elsewhere; when
    the zombie thaws, its result is fenced out: exactly one success is recorded."""
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    suite.launch("executor_manager_2", module="executor_manager")
    suite.wait_serving("executor_manager_2")
    frozen = None
    try:
        with suite.client(api_key) as client:
            name = unique("sleepy").replace("_", "-")
            client.create_function(name, "examples.demo:sleep",
                                   retry_config=common_pb2.RetryConfig(min_backoff=seconds(0.1)))
            task = client.create_task(name, b"4000")
            eventually(lambda: client.get_task(task.task_id).state == State.TASK_STATE_RUNNING,
                       timeout=60, message="the task running")
            executor = store.get(TaskKey(tenant_id, task.task_id)).status.executor_id
            frozen = next(n for n in ("executor_manager", "executor_manager_2")
                          if suite.address(n) == executor)
            suite.pause(frozen)
            done = wait(client, task.task_id, timeout=60)
            suite.resume(frozen)
            log = suite.services[frozen].log_path
            eventually(lambda: "late result rejected" in log.read_text(), timeout=30,
                       message="the zombie's result rejected")
            frozen = None
            final = client.get_task(task.task_id)
    finally:
        if frozen:
            suite.resume(frozen)
        suite.terminate("executor_manager_2")
    assert done.state == State.TASK_STATE_SUCCEEDED
    assert [a.exit_reason for a in final.attempts] == [Exit.EXIT_REASON_LEASE_LOST,
                                                       Exit.EXIT_REASON_RETURNED]
    assert [s.state for s in final.stages].count(State.TASK_STATE_SUCCEEDED) == 1
    assert final.attempts == done.attempts  # the zombie changed nothing


def test_a_retried_create_with_a_request_id_returns_the_first_task(suite, tenant):
    _, api_key = tenant
    request_id = unique("request")
    with suite.client(api_key) as client:
        first = client.create_task("echo", b"one", request_id=request_id)
        second = client.create_task("echo", b"two", request_id=request_id)
    assert second.task_id == first.task_id


# --- delays and schedules ----------------------------------------------------------------

def queued_lateness(task: tasks_pb2.Task) -> float:
    """Seconds from the task's schedule_time to its QUEUED stage."""
    queued = [s for s in task.stages if s.state == State.TASK_STATE_QUEUED]
    return (at(queued[0].time) - at(task.schedule_time)).total_seconds()


def test_delayed_tasks_start_on_time_and_not_before(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        created = [client.create_task("echo", b"later", delay=timedelta(seconds=d))
                   for d in (1, 1.5, 2, 3)]
        assert all(t.state == State.TASK_STATE_SCHEDULED for t in created)
        done = [wait(client, t.task_id, timeout=60) for t in created]
    late = [queued_lateness(t) for t in done]
    print(f"\ndelayed tasks queued this late after their schedule_time: "
          f"{', '.join(f'{x * 1000:.0f} ms' for x in late)}")
    for task in done:
        assert task.state == State.TASK_STATE_SUCCEEDED
        assert at(task.attempts[0].start_time) >= at(task.schedule_time)
    assert all(0 <= x < 1.0 for x in late)


def test_delayed_tasks_fire_on_time_across_a_dispatcher_restart(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        created = [client.create_task("echo", b"restart", delay=timedelta(seconds=d))
                   for d in (4, 5, 6)]
        suite.kill("dispatcher")
        suite.restart("dispatcher")
        done = [wait(client, t.task_id, timeout=90) for t in created]
    late = [queued_lateness(t) for t in done]
    print(f"\nafter a dispatcher kill -9 and restart, lateness: "
          f"{', '.join(f'{x * 1000:.0f} ms' for x in late)}")
    assert all(t.state == State.TASK_STATE_SUCCEEDED for t in done)
    assert all(0 <= x < 2.0 for x in late)


def test_a_timer_cursor_ahead_of_time_skips_no_timer(suite, cassandra, tenant):
    """Whatever moves a partition's timer cursor too far (a bug, a clock), timers due now
    still fire after the partitions are taken over."""
    _, api_key = tenant
    with suite.client(api_key) as client:
        created = [client.create_task("echo", b"cursor", delay=timedelta(seconds=8))
                   for _ in range(8)]
        ahead = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=5)
        suite.kill("dispatcher")
        forever = int((datetime.now(UTC) + timedelta(days=1)).timestamp() * 1e6)
        for topic in {r.topic for r in cassandra.execute("SELECT topic FROM partition_owners")}:
            for row in cassandra.execute(
                    "SELECT partition FROM partition_owners WHERE topic = %s", (topic,)):
                cassandra.execute("UPDATE partition_owners USING TIMESTAMP %s SET timer_minute "
                                  "= %s WHERE topic = %s AND partition = %s",
                                  (forever, ahead, topic, row.partition))
        suite.restart("dispatcher")
        done = [wait(client, t.task_id, timeout=90) for t in created]
    assert all(t.state == State.TASK_STATE_SUCCEEDED for t in done)


# --- expiry ------------------------------------------------------------------------------

def test_a_task_that_expires_while_held_never_starts(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "strict")
        client.pause_function(function)
        task = client.create_task(function, b"good", max_age=seconds(1.0))
        done = wait(client, task.task_id, timeout=30)
        assert done.state == State.TASK_STATE_EXPIRED
        client.resume_function(function)
        after = client.get_task(task.task_id)
    assert after.state == State.TASK_STATE_EXPIRED
    assert len(after.attempts) == 0
    assert State.TASK_STATE_RUNNING not in [s.state for s in after.stages]


def test_a_retry_that_would_start_after_the_expiry_ends_the_task_expired(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "flaky", max_attempts=5, min_backoff=5.0)
        task = client.create_task(function, flaky(2), max_age=seconds(3.0))
        done = wait(client, task.task_id, timeout=30)
    assert done.state == State.TASK_STATE_EXPIRED
    assert len(done.attempts) == 1


# --- cancel ------------------------------------------------------------------------------

def test_cancelling_a_running_task_stops_its_worker_and_it_never_retries(suite, tenant,
                                                                         tenant_factory):
    _, api_key = tenant
    _, other_key = tenant_factory()
    em = executor_manager_pb2_grpc.ExecutorServiceStub(suite.internal_channel("executor_manager"))
    with suite.client(api_key) as client:
        task = client.create_task("sleep", b"60000")
        eventually(lambda: client.get_task(task.task_id).state == State.TASK_STATE_RUNNING,
                   timeout=60, message="the sleep task running")
        with suite.client(other_key) as other, pytest.raises(errors.NotFound):
            other.cancel_task(task.task_id)  # another tenant cannot even see it
        cancelled = client.cancel_task(task.task_id, reason="no longer needed")
        assert cancelled.state == State.TASK_STATE_CANCELLED
        # The worker was stopped: its slot is free again within 2 s.
        eventually(lambda: em.GetLoad(executor_manager_pb2.GetLoadRequest(),
                                      timeout=2).in_flight == 0,
                   timeout=2, interval=0.05, message="the attempt's worker stopped")
        # Nothing brings it back: a fresh task runs on the freed worker, this one stays put.
        assert wait(client, client.create_task("echo", b"next").task_id,
                           timeout=60).state == State.TASK_STATE_SUCCEEDED
        final = client.get_task(task.task_id)
        assert client.cancel_task(task.task_id).state == State.TASK_STATE_CANCELLED  # idempotent
    assert final.state == State.TASK_STATE_CANCELLED
    assert [a.exit_reason for a in final.attempts] == [Exit.EXIT_REASON_CANCELLED]
    states = [s.state for s in final.stages]
    assert states[-1] == State.TASK_STATE_CANCELLED and states.count(State.TASK_STATE_RUNNING) == 1
    assert "no longer needed" in final.stages[-1].detail


def test_cancelling_a_queued_task_ends_it_without_running(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "strict")
        client.pause_function(function)
        task = client.create_task(function, b"good")
        assert client.cancel_task(task.task_id).state == State.TASK_STATE_CANCELLED
        client.resume_function(function)
        canary = client.create_task(function, b"good")
        assert wait(client, canary.task_id, timeout=60).state == State.TASK_STATE_SUCCEEDED
        final = client.get_task(task.task_id)
    assert final.state == State.TASK_STATE_CANCELLED and not final.attempts


# --- pause and resume --------------------------------------------------------------------

def test_a_paused_function_holds_a_thousand_tasks_and_resume_runs_them_all(suite, cassandra,
                                                                           tenant):
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    with suite.client(api_key) as client:
        function = register(client, "strict")
        assert client.pause_function(function).state == 2  # FUNCTION_STATE_PAUSED
        results = client.create_tasks([{"function": function, "payload": b"good"}
                                       for _ in range(1000)])
        ids = [r.task.task_id for r in results]

        def parked() -> bool:
            row = cassandra.execute("SELECT count(*) FROM parked_tasks WHERE tenant_id = %s "
                                    "AND function = %s", (tenant_id, function)).one()
            return row.count == 1000

        eventually(parked, timeout=120, interval=0.5, message="all 1,000 tasks held")
        states = {s.state for s in store.get_many(TaskKey(tenant_id, i) for i in ids)}
        assert states == {State.TASK_STATE_QUEUED}  # held, none dispatched, none lost
        assert client.resume_function(function).state == 1  # FUNCTION_STATE_ACTIVE

        def all_done() -> bool:
            found = store.get_many(TaskKey(tenant_id, i) for i in ids)
            done = sum(s.state == State.TASK_STATE_SUCCEEDED for s in found)
            assert done == 1000, f"{done} of 1,000 done"
            return True

        eventually(all_done, timeout=240, interval=1.0, message="every held task run")


# --- batch operations --------------------------------------------------------------------

def test_batch_cancel_of_ten_thousand_tasks_while_another_tenant_keeps_flowing(
        suite, cassandra, tenant_factory):
    tenant_id, api_key = tenant_factory()
    _, other_key = tenant_factory()
    store = TaskStateStore(cassandra)
    with suite.client(api_key) as client, suite.client(other_key) as other:
        ids = []
        for _ in range(10):
            ids += [r.task.task_id for r in client.create_tasks(
                {"function": "echo", "payload": b"bulk",
                 "schedule_time": _in(timedelta(hours=1))} for _ in range(1000))]
        operation = client.batch_cancel_tasks('function = "echo"', request_id="cancel-all")
        assert client.batch_cancel_tasks('function = "echo"',
                                         request_id="cancel-all").name == operation.name
        # Meanwhile the other tenant's tasks run as usual, each within seconds.
        flowing = []
        while client.get_operation(operation.name).state in (1, 2):  # PENDING, RUNNING
            created = other.create_task("echo", b"still flowing")
            flowing.append(wait(other, created.task_id, timeout=30))
        finished = client.get_operation(operation.name)
    print(f"\nbatch cancel of 10,000: {_seconds(finished):.1f}s; the other tenant ran "
          f"{len(flowing)} tasks meanwhile, slowest "
          f"{max(_run_seconds(t) for t in flowing):.2f}s from create to done")
    assert finished.state == 3, finished.error  # SUCCEEDED
    assert finished.matched_count == finished.processed_count == 10_000
    assert finished.failed_count == 0
    assert flowing and all(t.state == State.TASK_STATE_SUCCEEDED for t in flowing)

    def all_cancelled() -> bool:  # the owners apply the cancels after the operation sent them
        states = set()
        for start in range(0, len(ids), 500):
            states |= {s.state for s in store.get_many(
                (TaskKey(tenant_id, i) for i in ids[start:start + 500]), history=False)}
        assert states == {State.TASK_STATE_CANCELLED}, states
        return True

    eventually(all_cancelled, timeout=60, interval=1.0, message="every task cancelled")


def test_a_batch_operation_survives_its_gateway_being_killed(suite, cassandra, tenant):
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    with suite.client(api_key) as client:
        ids = [r.task.task_id for r in client.create_tasks(
            {"function": "echo", "schedule_time": _in(timedelta(hours=1))} for _ in range(2000))]
        operation = client.batch_cancel_tasks('function = "echo"')
        eventually(lambda: client.get_operation(operation.name).processed_count > 0,
                   timeout=30, interval=0.05, message="the operation under way")
    suite.kill("gateway")
    suite.restart("gateway")  # its runner takes the silent operation over from its checkpoint
    with suite.client(api_key) as client:
        finished = client.wait_operation(operation.name, timeout=120)
    assert finished.state == 3, finished.error  # SUCCEEDED
    assert finished.failed_count == 0
    assert finished.processed_count >= 2000  # a few after the last checkpoint are redone

    def all_cancelled() -> bool:  # the owners apply the cancels after the operation sent them
        states = {s.state for s in store.get_many(
            (TaskKey(tenant_id, i) for i in ids), history=False)}
        assert states == {State.TASK_STATE_CANCELLED}, states
        return True

    eventually(all_cancelled, timeout=60, interval=1.0, message="every task cancelled")


def test_batch_delete_removes_the_matching_tasks_and_keeps_their_ids_claimed(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        kept = client.create_task("echo", b"kept", labels={"batch": "keep"})
        doomed = [client.create_task("echo", b"doomed", task_id=unique("doomed"),
                                     labels={"batch": "delete"}) for _ in range(5)]
        for task in [kept, *doomed]:
            wait(client, task.task_id, timeout=60)
        operation = client.wait_operation(
            client.batch_delete_tasks('labels.batch = "delete"').name, timeout=60)
        assert operation.state == 3 and operation.processed_count == 5
        for task in doomed:
            with pytest.raises(errors.NotFound):
                client.get_task(task.task_id)
            with pytest.raises(errors.AlreadyExists):
                client.create_task("echo", task_id=task.task_id)
        assert client.get_task(kept.task_id).state == State.TASK_STATE_SUCCEEDED
        client.delete_task(kept.task_id)
        with pytest.raises(errors.NotFound):
            client.get_task(kept.task_id)


def test_an_operation_can_be_cancelled_and_another_tenant_cannot_see_it(suite,
                                                                        tenant_factory):
    _, api_key = tenant_factory()
    _, other_key = tenant_factory()
    with suite.client(api_key) as client, suite.client(other_key) as other:
        client.create_tasks({"function": "echo", "schedule_time": _in(timedelta(hours=1))}
                            for _ in range(200))
        operation = client.batch_cancel_tasks('function = "echo"')
        with pytest.raises(errors.NotFound):
            other.get_operation(operation.name)
        client.cancel_operation(operation.name)
        ended = client.wait_operation(operation.name, timeout=30)
    assert ended.state in (3, 5)  # SUCCEEDED if it finished first, else CANCELLED
    assert ended.end_time.seconds > 0


# --- dead letters ------------------------------------------------------------------------

def test_a_dead_letter_redriven_with_a_patched_payload_succeeds(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "strict")
        bad = [client.create_task(function, b"bad") for _ in range(3)]
        for task in bad:
            assert wait(client, task.task_id, timeout=60).state == State.TASK_STATE_FAILED
        letters = eventually(lambda: len(list(client.list_dead_letters(
            f'function = "{function}"'))) == 3 and list(client.list_dead_letters(
                f'function = "{function}" AND error_class = ERROR_CLASS_NON_RETRYABLE')),
            timeout=10)
        assert {letter.task_id for letter in letters} == {t.task_id for t in bad}
        operation = client.redrive_dead_letters([bad[0].task_id], payload_override=b"good")
        assert client.wait_operation(operation.name, timeout=60).processed_count == 1
        redriven = wait_attempts(client, bad[0].task_id, 2, timeout=60)
        # The others by filter, with their own (still bad) payload: they fail again.
        operation = client.redrive_dead_letters(filter=f'function = "{function}"')
        assert client.wait_operation(operation.name, timeout=60).processed_count == 2
        again = [wait_attempts(client, t.task_id, 2, timeout=60) for t in bad[1:]]
        with pytest.raises(errors.NotFound):
            client.get_dead_letter(bad[0].task_id)
        refiled = eventually(lambda: client.get_dead_letter(bad[1].task_id), timeout=10)
    assert redriven.state == State.TASK_STATE_SUCCEEDED and redriven.result == b"accepted"
    assert [a.exit_reason for a in redriven.attempts] == [Exit.EXIT_REASON_RAISED,
                                                          Exit.EXIT_REASON_RETURNED]
    assert all(t.state == State.TASK_STATE_FAILED and len(t.attempts) == 2 for t in again)
    assert refiled.redrive_count == 1 and len(refiled.attempts) == 2


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields, path", [
    ({"schedule_time": "in 31 days"}, "task.schedule_time"),
    ({"max_age": seconds(0.5)}, "task.max_age"),
    ({"expire_time": "an hour ago"}, "task.expire_time"),
    ({"retry_config": common_pb2.RetryConfig(max_attempts=1000)},
     "task.retry_config.max_attempts"),
    ({"retry_config": common_pb2.RetryConfig(min_backoff=seconds(0.01))},
     "task.retry_config.min_backoff"),
])
def test_bad_timing_and_retry_settings_are_refused_naming_the_field(suite, tenant, fields,
                                                                    path):
    _, api_key = tenant
    if fields.get("schedule_time") == "in 31 days":
        fields["schedule_time"] = _in(timedelta(days=31))
    if fields.get("expire_time") == "an hour ago":
        fields["expire_time"] = _in(timedelta(hours=-1))
    with suite.client(api_key) as client, pytest.raises(errors.InvalidArgument) as raised:
        client.create_task("echo", b"x", **fields)
    assert path in raised.value.violations


def test_bad_batch_and_redrive_requests_are_refused(suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            client.batch_cancel_tasks("  ")
        assert "filter" in raised.value.violations
        with pytest.raises(errors.InvalidArgument):
            client.batch_delete_tasks("colour = red")
        with pytest.raises(errors.InvalidArgument) as raised:
            client.redrive_dead_letters(["a"], filter='function = "x"')
        assert "task_ids" in raised.value.violations
        with pytest.raises(errors.NotFound):
            client.get_operation("op-" + "0" * 32)
        with pytest.raises(errors.InvalidArgument):
            client.get_operation("op-does-not-exist")
        with pytest.raises(errors.NotFound):
            client.cancel_task("no-such-task")


def _in(delta: timedelta):
    from google.protobuf import timestamp_pb2

    when = timestamp_pb2.Timestamp()
    when.FromDatetime(datetime.now(UTC) + delta)
    return when


def _seconds(operation) -> float:
    return (at(operation.end_time) - at(operation.create_time)).total_seconds()


def _run_seconds(task: tasks_pb2.Task) -> float:
    return (at(task.update_time) - at(task.create_time)).total_seconds()


def test_a_watch_of_a_redriven_task_follows_it_to_its_new_end_with_the_task_each_time(
        suite, tenant):
    _, api_key = tenant
    with suite.client(api_key) as client:
        function = register(client, "strict")
        task = client.create_task(function, b"bad")
        assert wait(client, task.task_id, timeout=60).state == State.TASK_STATE_FAILED
        eventually(lambda: list(client.list_dead_letters(f'function = "{function}"')),
                   timeout=10)
        operation = client.redrive_dead_letters([task.task_id], payload_override=b"good")
        assert client.wait_operation(operation.name, timeout=60).processed_count == 1
        changes = list(client.watch(task.task_id, timeout=60))
    states = [change.stage.state for change in changes]
    assert State.TASK_STATE_FAILED in states[:-1]  # the old end is passed, not the last word
    assert states[-1] == State.TASK_STATE_SUCCEEDED
    assert changes[-1].task.result == b"accepted"
    for change in changes:  # each message carries the task (BASIC view), not just its state
        assert change.task.task_id == task.task_id and change.task.function == function
        assert change.task.HasField("create_time")
