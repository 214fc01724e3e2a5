"""The partition owner's decisions, without I/O: what it dispatches, writes and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, status_pb2
from weir.internal.dispatcher.v1 import dispatcher_pb2
from weir.internal.router.v1 import router_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs.cassandra.owners import Ownership, TimestampRange
from libs.cassandra.taskstate import StoredTask, TaskKey, timestamp_of
from services.dispatcher import owner as owner_module
from services.dispatcher.owner import Owner, RecordAck
from tests.helpers import Clock

State = tasks_pb2.TaskState
Exit = tasks_pb2.ExitReason
PARTITION = ("weir.tasks.normal", 3)
ECHO = functions_pb2.Function(name="echo", handler="examples.demo:echo",
                              state=functions_pb2.FunctionState.FUNCTION_STATE_ACTIVE)


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


def owning(clock: Clock, **options) -> Owner:
    """An owner holding PARTITION, adopted; ``options`` go to `Owner`."""
    owner = Owner(lease=timedelta(seconds=30), dispatcher_id="d1", clock=clock, **options)
    now = int(datetime.now(UTC).timestamp() * 1e6)
    owner.own(Ownership(*PARTITION, epoch=2, range_start=now, range_end=now + 60_000_000,
                        timer_minute=None), replay_below=0)
    owner.adopted(PARTITION)
    return owner


@pytest.fixture
def owner(clock: Clock) -> Owner:
    return owning(clock)


def message(task_id: str, **fields) -> records_pb2.TaskMessage:
    created = timestamp_of(datetime.now(UTC) - timedelta(seconds=1))
    fields.setdefault("function", "echo")
    fields.setdefault("payload", b"p")
    return records_pb2.TaskMessage(tenant_id="t1", task_id=task_id, attempt_number=1,
                                   create_time=created, **fields)


class Acks:
    def __init__(self) -> None:
        self.count = 0

    def record(self, tasks: int = 1) -> RecordAck:
        def acked() -> None:
            self.count += 1
        return RecordAck(acked, tasks)


def connect(owner: Owner, credits: int) -> int:
    owner.connect(1, "em-1", lambda: None)
    owner.work(1, dispatcher_pb2.WorkRequest(executor_id="em-1", credits=credits))
    return 1


def assignments(owner: Owner) -> list[dispatcher_pb2.Assignment]:
    response = owner.next_response(1)
    return list(response.assignments) if response else []


def report(owner: Owner, assignment: dispatcher_pb2.Assignment, *, ok: bool = True,
           error_class: int = common_pb2.ErrorClass.ERROR_CLASS_RETRYABLE) -> None:
    now = timestamp_of(datetime.now(UTC))
    done = dispatcher_pb2.AttemptReport(
        attempt_id=assignment.attempt_id, topic=assignment.topic,
        partition=assignment.partition, start_time=now, end_time=now, result=b"r",
        exit_reason=Exit.EXIT_REASON_RETURNED if ok else Exit.EXIT_REASON_RAISED)
    if not ok:
        done.status.CopyFrom(status_pb2.Status(code=code_pb2.UNAVAILABLE, message="boom"))
        done.error_class = error_class
    owner.work(1, dispatcher_pb2.WorkRequest(reports=[done]))


def test_a_fresh_task_waits_for_credit_then_goes_out_and_its_record_acks_once_written(
        owner, clock):
    acks = Acks()
    owner.take(PARTITION, message("a"), ECHO, acks.record())
    assert owner.collect().writes == []  # nothing durable yet: the record is not acked
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    assert assignment.task.task_id == "a" and assignment.handler == "examples.demo:echo"
    assert owner.collect().writes == []  # a short attempt is written only when it ends...
    clock.now += 0.2
    owner.tick()  # ...or once it has been out for a while
    batch = owner.collect()
    [write] = batch.writes
    assert write.state == State.TASK_STATE_DISPATCHED
    assert [s.state for s in write.history.stages] == [State.TASK_STATE_DISPATCHED]
    [out] = write.history.attempts  # the attempt as it stands, for an adopting owner
    assert out.attempt_number == 1 and not out.HasField("end_time")
    assert batch.inflight  # listed for a next owner to adopt
    assert acks.count == 0
    owner.flushed(batch)
    assert acks.count == 1


def test_a_short_task_is_one_write_from_dispatch_to_success(owner):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    report(owner, assignment)
    batch = owner.collect()
    [write] = batch.writes
    assert write.state == State.TASK_STATE_SUCCEEDED and write.result == b"r"
    assert [s.state for s in write.history.stages] == [
        State.TASK_STATE_DISPATCHED, State.TASK_STATE_RUNNING, State.TASK_STATE_SUCCEEDED]
    assert [o.state for o in owner.flushed(batch)] == [State.TASK_STATE_SUCCEEDED]
    assert owner.stats()["held"] == 0


def test_writes_of_one_task_carry_increasing_timestamps_above_its_creation(owner, clock):
    created = message("a")
    owner.take(PARTITION, created, ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    clock.now += 0.2
    owner.tick()
    first = owner.collect().writes[0].timestamp
    report(owner, assignment)
    second = owner.collect().writes[0].timestamp
    assert created.create_time.ToMicroseconds() < first < second


def test_a_retryable_failure_waits_for_its_timer_and_a_non_retryable_one_fails(owner):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    owner.take(PARTITION, message("b"), ECHO, Acks().record())
    connect(owner, credits=2)
    first, second = assignments(owner)
    report(owner, first, ok=False)
    report(owner, second, ok=False,
           error_class=common_pb2.ErrorClass.ERROR_CLASS_NON_RETRYABLE)
    batch = owner.collect()
    states = {w.key.task_id: w.state for w in batch.writes}
    assert states == {"a": State.TASK_STATE_RETRY_WAIT, "b": State.TASK_STATE_FAILED}
    [timer] = batch.timers[PARTITION]
    assert timer.task_id == "a" and timer.kind == records_pb2.TimerKind.TIMER_KIND_RUN
    assert [d.spec.task.task_id for d in batch.dead_letters] == ["b"]


def test_a_report_of_an_attempt_the_owner_does_not_hold_is_stale(owner):
    connect(owner, credits=1)
    owner.next_response(1)
    owner.work(1, dispatcher_pb2.WorkRequest(reports=[dispatcher_pb2.AttemptReport(
        attempt_id=f"{PARTITION[0]}/{PARTITION[1]}/1/99", topic=PARTITION[0],
        partition=PARTITION[1], end_time=timestamp_of(datetime.now(UTC)))]))
    response = owner.next_response(1)
    assert list(response.stale) == [f"{PARTITION[0]}/{PARTITION[1]}/1/99"]
    assert owner.collect().writes == []


def test_a_report_for_a_partition_it_does_not_own_is_moved(owner):
    connect(owner, credits=1)
    owner.next_response(1)
    owner.work(1, dispatcher_pb2.WorkRequest(renew=["weir.tasks.low/0/4/7"]))
    assert list(owner.next_response(1).moved) == ["weir.tasks.low/0/4/7"]


def test_a_lease_that_runs_out_is_retried_as_lease_lost(owner, clock):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    connect(owner, credits=1)
    assignments(owner)
    owner.flushed(owner.collect())
    clock.now += 31
    owner.tick()
    [write] = owner.collect().writes
    assert write.state == State.TASK_STATE_RETRY_WAIT
    [attempt] = write.history.attempts
    assert attempt.exit_reason == Exit.EXIT_REASON_LEASE_LOST


def test_renewals_keep_a_long_attempt_out(owner, clock):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    owner.flushed(owner.collect())
    for _ in range(5):
        clock.now += 20
        owner.work(1, dispatcher_pb2.WorkRequest(renew=[assignment.attempt_id]))
        owner.tick()
    assert owner.stats()["out"] == 1


def test_cancelling_an_attempt_out_tells_its_executor_and_ends_the_task(owner):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    owner.take(PARTITION, message("a", kind=records_pb2.MessageKind.MESSAGE_KIND_CANCEL,
                                  reason="no longer needed"), ECHO, Acks().record())
    assert list(owner.next_response(1).cancel) == [assignment.attempt_id]
    [write] = owner.collect().writes
    assert write.state == State.TASK_STATE_CANCELLED
    assert write.history.attempts[-1].exit_reason == Exit.EXIT_REASON_CANCELLED
    report(owner, assignment)  # its late result changes nothing
    assert list(owner.next_response(1).stale) == [assignment.attempt_id]
    assert owner.collect().writes == []


def test_a_cancelled_waiting_task_never_goes_out(owner):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    owner.take(PARTITION, message("a", kind=records_pb2.MessageKind.MESSAGE_KIND_CANCEL),
               ECHO, Acks().record())
    connect(owner, credits=5)
    assert assignments(owner) == []
    [write] = owner.collect().writes
    assert write.state == State.TASK_STATE_CANCELLED


def test_a_paused_functions_task_is_parked(owner):
    paused = functions_pb2.Function()
    paused.CopyFrom(ECHO)
    paused.state = functions_pb2.FunctionState.FUNCTION_STATE_PAUSED
    owner.take(PARTITION, message("a"), paused, Acks().record())
    connect(owner, credits=5)
    assert assignments(owner) == []
    batch = owner.collect()
    assert [m.task_id for _, m in batch.parked] == ["a"]
    assert batch.writes[0].status.parked


def test_a_task_waiting_for_a_slot_when_its_function_is_paused_is_parked_not_sent(clock):
    paused = functions_pb2.Function()
    paused.CopyFrom(ECHO)
    paused.state = functions_pb2.FunctionState.FUNCTION_STATE_PAUSED
    now = {"echo": ECHO}
    owner = owning(clock, functions=lambda tenant, name, default: now.get(name, default))
    owner.take(PARTITION, message("a"), ECHO, Acks().record())  # waits: no credit yet
    now["echo"] = paused
    connect(owner, credits=5)
    assert assignments(owner) == []
    assert [m.task_id for _, m in owner.collect().parked] == ["a"]


def test_a_task_whose_expiry_passes_while_it_waits_for_a_slot_ends_expired(owner, monkeypatch):
    soon = datetime.now(UTC) + timedelta(seconds=5)
    owner.take(PARTITION, message("a", expire_time=timestamp_of(soon)), ECHO, Acks().record())
    monkeypatch.setattr(owner_module, "now_utc", lambda: soon + timedelta(seconds=1))
    connect(owner, credits=5)
    assert assignments(owner) == []
    assert owner.collect().writes[0].state == State.TASK_STATE_EXPIRED


def test_an_expired_task_ends_expired_without_going_out(owner):
    expired = message("a", expire_time=timestamp_of(datetime.now(UTC) - timedelta(seconds=1)))
    owner.take(PARTITION, expired, ECHO, Acks().record())
    connect(owner, credits=5)
    assert assignments(owner) == []
    assert owner.collect().writes[0].state == State.TASK_STATE_EXPIRED


def test_a_scheduled_task_writes_only_its_timer(owner):
    later = message("a", schedule_time=timestamp_of(datetime.now(UTC) + timedelta(hours=1)))
    acks = Acks()
    owner.take(PARTITION, later, ECHO, acks.record())
    batch = owner.collect()
    assert batch.writes == []
    assert [t.task_id for t in batch.timers[PARTITION]] == ["a"]
    owner.flushed(batch)
    assert acks.count == 1 and owner.stats()["held"] == 0


def test_a_due_timer_queues_the_task_again_with_its_next_attempt(owner):
    due = datetime.now(UTC).replace(microsecond=0)
    spec = records_pb2.TaskSpec(tenant_id="t1", topic=PARTITION[0], partition=PARTITION[1])
    spec.task.task_id, spec.task.function, spec.task.payload = "a", "echo", b"p"
    stored = StoredTask(spec=spec, state=State.TASK_STATE_RETRY_WAIT,
                        status=records_pb2.TaskStatus(attempt_count=1,
                                                      next_run_time=timestamp_of(due)))
    from libs.cassandra.partition_index import Timer
    owner.fire(PARTITION, Timer("t1", "a", due, records_pb2.TimerKind.TIMER_KIND_RUN), stored,
               ECHO)
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    assert assignment.task.attempt_number == 2
    stale = Timer("t1", "a", due + timedelta(seconds=5), records_pb2.TimerKind.TIMER_KIND_RUN)
    owner.fire(PARTITION, stale, stored, ECHO)  # held already: nothing
    assert owner.stats()["held"] == 1


def test_a_disowned_partition_is_forgotten_and_its_reports_move(owner):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    owner.disown(PARTITION)
    assert owner.stats() == {"held": 0, "ready": 0, "out": 0, "dirty": 0, "partitions": 0}
    report(owner, assignment)
    response = owner.next_response(1)
    assert list(response.moved) == [assignment.attempt_id]
    assert response.owned_changed and list(response.owned) == []


def test_a_ranges_timestamps_never_pass_its_end():
    ownership = Ownership("t", 0, 1, range_start=100, range_end=105, timer_minute=None)
    now = [0]
    stamps = TimestampRange(ownership, clock=lambda: now[0])
    assert [stamps.next() for _ in range(5)] == [100, 101, 102, 103, 104]
    with pytest.raises(TimestampRange.Exhausted):
        stamps.next()
    stamps.extend(Ownership("t", 0, 1, range_start=100, range_end=200, timer_minute=None))
    now[0] = 150
    assert stamps.next(floor=170) == 171


def test_higher_tiers_go_out_first_and_partitions_take_turns(owner):
    other = ("weir.tasks.normal", 4)
    now = int(datetime.now(UTC).timestamp() * 1e6)
    owner.own(Ownership(*other, epoch=1, range_start=now, range_end=now + 60_000_000,
                        timer_minute=None), replay_below=0)
    owner.adopted(other)
    for i in range(3):
        owner.take(PARTITION, message(f"p{i}", priority=common_pb2.Priority.PRIORITY_LOW),
                   ECHO, Acks().record())
        owner.take(other, message(f"q{i}"), ECHO, Acks().record())
    owner.take(PARTITION, message("urgent", priority=common_pb2.Priority.PRIORITY_HIGH),
               ECHO, Acks().record())
    connect(owner, credits=7)
    order = [a.task.task_id for a in assignments(owner)]
    assert order[0] == "urgent"
    assert set(order[1:4]) == {"q0", "q1", "q2"} and order[4:] == ["p0", "p1", "p2"]


def test_outcomes_and_assignments_carry_the_tasks_timeout_and_targets(owner):
    slow = functions_pb2.Function()
    slow.CopyFrom(ECHO)
    slow.timeout.CopyFrom(Duration(seconds=5))
    slow.worker_concurrency = 3
    owner.take(PARTITION, message("a"), slow, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    assert assignment.timeout.seconds == 5 and assignment.worker_concurrency == 3
    report(owner, assignment)
    batch = owner.collect()
    assert TaskKey("t1", "a") in {w.key for w in batch.writes}
    assert [o.task_id for _, o in batch.outcomes] == ["a"]


def limited(**limits: float) -> functions_pb2.Function:
    function = functions_pb2.Function()
    function.CopyFrom(ECHO)
    function.rate_limits.CopyFrom(common_pb2.RateLimits(**limits))
    return function


def share(owner: Owner, *, rate: float = 0, burst: float = 0, slots: int = 0,
          lease: float = 2.0) -> None:
    owner.share_limits([router_pb2.LimitShare(tenant_id="t1", function="echo", rate=rate,
                                              burst=burst, slots=slots)], lease=lease)


def test_a_limited_function_waits_for_its_share_and_its_cap_holds_until_an_attempt_ends(owner):
    capped = limited(max_concurrent_dispatches=1)
    for name in ("a", "b"):
        owner.take(PARTITION, message(name), capped, Acks().record())
    owner.take(PARTITION, message("other", function="echo2"), ECHO, Acks().record())
    connect(owner, credits=5)
    assert [a.task.task_id for a in assignments(owner)] == ["other"]  # no share yet
    assert owner.limits_wanted()
    [demand] = owner.limit_demands()
    assert (demand.function, demand.waiting, demand.out, demand.held_slots) == ("echo", 2, 0, 0)
    share(owner, slots=1)
    [first] = assignments(owner)
    assert first.task.task_id == "a"
    report(owner, first)
    assert [a.task.task_id for a in assignments(owner)] == ["b"]


def test_a_rate_share_paces_dispatches_and_a_share_not_renewed_stops_them(owner, clock):
    paced = limited(max_dispatches_per_second=10, max_burst_size=2)
    for n in range(10):
        owner.take(PARTITION, message(f"t{n}"), paced, Acks().record())
    connect(owner, credits=10)
    share(owner, rate=10, burst=2)
    assert assignments(owner) == []  # a new share starts with an empty bucket
    clock.now += 0.1
    owner.pace()
    assert len(assignments(owner)) == 1
    clock.now += 1.0  # the bucket holds two at most
    owner.pace()
    assert len(assignments(owner)) == 2
    clock.now += 5.0  # the share's lease (2 s) ran out without a renewal
    owner.pace()
    assert assignments(owner) == []
    [demand] = owner.limit_demands()
    # Waiting, plus its recent pace: 3 in the 6.1 s since it began, 1 a second rounded up.
    assert (demand.waiting, demand.held_rate) == (7 + 1, 0)


def test_a_record_of_a_partition_not_adopted_yet_is_not_taken(owner):
    other = ("weir.tasks.normal", 9)
    now = int(datetime.now(UTC).timestamp() * 1e6)
    owner.own(Ownership(*other, epoch=1, range_start=now, range_end=now + 60_000_000,
                        timer_minute=None), replay_below=0)
    assert not owner.take(other, message("a"), ECHO, Acks().record())
    owner.adopted(other)
    assert owner.take(other, message("a"), ECHO, Acks().record())


def stored_with_second_attempt_out(attempt_id: str) -> StoredTask:
    """A task whose first attempt failed and whose second is out, as another owner wrote it."""
    spec = records_pb2.TaskSpec(tenant_id="t1", topic=PARTITION[0], partition=PARTITION[1])
    spec.task.task_id, spec.task.function, spec.task.payload = "a", "echo", b"p"
    now = datetime.now(UTC)
    first = tasks_pb2.Attempt(attempt_number=1, executor_id="em-0",
                              end_time=timestamp_of(now - timedelta(seconds=5)),
                              exit_reason=Exit.EXIT_REASON_RAISED)
    second = tasks_pb2.Attempt(attempt_number=2, executor_id="em-1",
                               dispatch_time=timestamp_of(now - timedelta(seconds=1)))
    status = records_pb2.TaskStatus(attempt_count=2, attempt_id=attempt_id, executor_id="em-1",
                                    lease_expire_time=timestamp_of(now + timedelta(seconds=20)))
    return StoredTask(spec=spec, state=State.TASK_STATE_DISPATCHED, status=status,
                      history=[records_pb2.TaskHistory(attempts=[first]),
                               records_pb2.TaskHistory(attempts=[second])])


def test_an_adopted_attempt_is_the_one_out_and_its_report_ends_it_not_an_earlier_one(owner):
    attempt_id = f"{PARTITION[0]}/{PARTITION[1]}/1/5"
    owner.adopt(PARTITION, [stored_with_second_attempt_out(attempt_id)], lambda *_: ECHO)
    owner.flushed(owner.collect())
    connect(owner, credits=0)
    owner.next_response(1)
    report(owner, dispatcher_pb2.Assignment(attempt_id=attempt_id, topic=PARTITION[0],
                                            partition=PARTITION[1]))
    [write] = owner.collect().writes
    assert write.state == State.TASK_STATE_SUCCEEDED
    [ended] = write.history.attempts
    assert ended.attempt_number == 2 and ended.exit_reason == Exit.EXIT_REASON_RETURNED
    assert ended.dispatch_time.seconds > 0  # continued, not made up


def test_cancelling_a_task_out_under_another_epoch_stops_the_attempt_out(owner):
    attempt_id = f"{PARTITION[0]}/{PARTITION[1]}/1/5"
    connect(owner, credits=0)
    owner.next_response(1)
    owner.take(PARTITION, message("a", kind=records_pb2.MessageKind.MESSAGE_KIND_CANCEL),
               None, Acks().record(), stored_with_second_attempt_out(attempt_id), checked=True)
    assert list(owner.next_response(1).cancel) == [attempt_id]
    [write] = owner.collect().writes
    assert write.state == State.TASK_STATE_CANCELLED
    [interrupted] = write.history.attempts
    assert interrupted.attempt_number == 2
    assert interrupted.exit_reason == Exit.EXIT_REASON_CANCELLED


def test_a_partition_lost_while_its_write_was_retried_confirms_nothing(owner):
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    report(owner, assignment)
    batch = owner.collect()
    owner.disown(PARTITION)  # the flusher's re-check found another epoch
    assert owner.flushed(batch) == []  # its successor publishes the outcome
    response = owner.next_response(1)
    assert list(response.moved) == [assignment.attempt_id] and not response.durable


def test_assignments_of_large_payloads_are_spread_over_several_messages(owner):
    for i in range(5):
        owner.take(PARTITION, message(f"big{i}", payload=b"x" * (1024 * 1024)), ECHO,
                   Acks().record())
    connect(owner, credits=5)
    first, second = assignments(owner), assignments(owner)
    assert (len(first), len(second)) == (3, 2)
    assert dispatcher_pb2.WorkResponse(assignments=first).ByteSize() <= 4 * 1024 * 1024


def test_a_tenants_limit_holds_over_all_its_functions(clock):
    tenant_cap = common_pb2.RateLimits(max_concurrent_dispatches=1)
    owner = owning(clock, tenant_limits=lambda tenant_id: tenant_cap if tenant_id == "t1"
                   else None)
    echo2 = functions_pb2.Function(name="echo2", handler="examples.demo:echo",
                                   state=functions_pb2.FunctionState.FUNCTION_STATE_ACTIVE)
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    owner.take(PARTITION, message("b", function="echo2"), echo2, Acks().record())
    connect(owner, credits=5)
    assert assignments(owner) == []
    [demand] = owner.limit_demands()
    assert (demand.tenant_id, demand.function, demand.waiting) == ("t1", "", 2)
    owner.share_limits([router_pb2.LimitShare(tenant_id="t1", function="", slots=1)], lease=2)
    [first] = assignments(owner)
    assert assignments(owner) == []  # the tenant's one slot is taken, whatever the function
    report(owner, first)
    [second] = assignments(owner)
    assert {first.task.function, second.task.function} == {"echo", "echo2"}


def test_normal_and_low_use_only_the_credits_beyond_an_executors_high_reserve(owner):
    """The executor grants 3 credits, 1 of them for HIGH only: two NORMAL go, the third
    waits, and a HIGH task arriving later takes the kept credit at once."""
    for n in range(3):
        owner.take(PARTITION, message(f"n{n}"), ECHO, Acks().record())
    owner.connect(1, "em-1", lambda: None)
    owner.work(1, dispatcher_pb2.WorkRequest(executor_id="em-1", credits=3,
                                             below_high_credits=2))
    assert [a.task.task_id for a in assignments(owner)] == ["n0", "n1"]
    owner.take(PARTITION, message("urgent", priority=common_pb2.Priority.PRIORITY_HIGH),
               ECHO, Acks().record())
    assert [a.task.task_id for a in assignments(owner)] == ["urgent"]
    owner.work(1, dispatcher_pb2.WorkRequest(credits=1, below_high_credits=1))
    assert [a.task.task_id for a in assignments(owner)] == ["n2"]


def test_a_tenants_quotas_by_priority_cap_low_and_keep_room_for_high(clock):
    """Tenant cap 4, HIGH reserve 0.25, LOW at most 0.5: LOW holds 2, NORMAL and LOW 3,
    and HIGH the last; each quota is a limit of its own, shared by the router."""
    quotas = common_pb2.RateLimits(max_concurrent_dispatches=4, high_reserved_fraction=0.25,
                                   low_max_fraction=0.5)
    owner = owning(clock, tenant_limits=lambda tenant_id: quotas)
    for n in range(3):
        owner.take(PARTITION, message(f"low{n}", priority=common_pb2.Priority.PRIORITY_LOW),
                   ECHO, Acks().record())
    for n in range(2):
        owner.take(PARTITION, message(f"normal{n}"), ECHO, Acks().record())
    connect(owner, credits=10)
    owner.share_limits([router_pb2.LimitShare(tenant_id="t1", function="", slots=4)],
                       lease=2.0)
    demands = {d.function: d for d in owner.limit_demands()}
    assert set(demands) == {"", "#below-high", "#low"}
    assert demands["#low"].limits.max_concurrent_dispatches == 2
    assert demands["#below-high"].limits.max_concurrent_dispatches == 3
    owner.share_limits([router_pb2.LimitShare(tenant_id="t1", function=f, slots=s)
                        for f, s in (("", 4), ("#below-high", 3), ("#low", 2))], lease=2.0)
    out = [a.task.task_id for a in assignments(owner)]
    assert len(out) == 3 and sum(t.startswith("low") for t in out) <= 2
    owner.take(PARTITION, message("urgent", priority=common_pb2.Priority.PRIORITY_HIGH),
               ECHO, Acks().record())
    assert [a.task.task_id for a in assignments(owner)] == ["urgent"]
