"""The Python worker runtime without gRPC: slots and their per-function limits, the batching
of updates, and how a handler's return or exception becomes an outcome."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import timedelta

import pytest
from google.rpc import code_pb2
from weir.v1 import common_pb2
from weir.worker.v1 import worker_pb2

from libs import sdk
from libs.sdk import worker
from libs.sdk.worker import Job, Outbox, Slots, Worker, responses, run_handler
from tests.helpers import eventually

ErrorClass = common_pb2.ErrorClass


class Gate:
    """A run function for `Slots` that holds every job until released, counting how many of
    each function run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = threading.Event()
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.order: list[str] = []

    def __call__(self, job: Job) -> None:
        function = job.assignment.function
        with self.lock:
            self.running[function] = self.running.get(function, 0) + 1
            self.most[function] = max(self.most.get(function, 0), self.running[function])
            self.order.append(job.assignment.attempt_id)
        self.open.wait(30)
        with self.lock:
            self.running[function] -= 1

    def started(self) -> int:
        with self.lock:
            return len(self.order)


def job(attempt_id: str, function: str, limit: int, outbox: Outbox | None = None) -> Job:
    return Job(worker_pb2.AttemptAssignment(attempt_id=attempt_id, tenant_id="t",
                                            function=function), limit, outbox or Outbox())


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.open.set()  # lets the slots' threads go back to waiting


def test_slots_run_no_more_of_a_function_than_its_limit_and_let_others_pass(gate):
    slots = Slots(4, gate)
    slots.submit([job(f"a{i}", "limited", 2) for i in range(4)]
                 + [job("b0", "free", 4), job("b1", "free", 4)])
    eventually(lambda: gate.started() == 4, message="four slots busy")
    assert gate.order[:2] == ["a0", "a1"] and sorted(gate.order[2:]) == ["b0", "b1"]
    gate.open.set()
    eventually(lambda: gate.started() == 6, message="the held-back ones run")
    assert gate.most == {"limited": 2, "free": 2}


def test_a_slot_never_runs_more_jobs_than_there_are_slots(gate):
    slots = Slots(3, gate)
    slots.submit([job(f"a{i}", f"f{i}", 1) for i in range(5)])
    eventually(lambda: gate.started() == 3, message="three slots busy")
    assert gate.started() == 3  # the other two wait for a slot
    gate.open.set()
    eventually(lambda: gate.started() == 5, message="all run")


def test_the_jobs_of_a_stream_that_ended_are_dropped_before_they_start(gate):
    slots = Slots(1, gate)
    gone = Outbox()
    slots.submit([job("first", "f", 1), job("dropped", "f", 1, gone), job("kept", "f", 1)])
    eventually(lambda: gate.started() == 1, message="the first running")
    slots.drop(gone)
    gate.open.set()
    eventually(lambda: gate.started() == 2, message="the next one")
    assert gate.order == ["first", "kept"]


def test_an_outbox_sends_a_quick_attempts_start_and_end_as_one_update():
    outbox = Outbox()
    assert outbox.accept(["a", "b"]) is None
    outbox.started("a", 10)
    outbox.ended("a", 10, 20, b"out")
    outbox.started("b", 15)
    assert outbox.take() == {"a": [10, 20, b"out", None, None],
                             "b": [15, 0, b"", None, None]}
    error = worker_pb2.HandlerError(error_class=ErrorClass.ERROR_CLASS_RETRYABLE)
    outbox.ended("b", 15, 30, error)
    outbox.close()
    assert outbox.take() == {"b": [15, 30, b"", error, None]}
    assert outbox.take() is None  # half-closed and nothing held: the stream ends


def test_an_outbox_refuses_empty_and_repeated_attempt_ids():
    outbox = Outbox()
    assert outbox.accept(["a"]) is None
    assert "without attempt_id" in outbox.accept([""])
    assert "already held" in outbox.accept(["a"])
    assert "already held" in outbox.accept(["b", "b"])
    outbox.started("a", 1)
    outbox.ended("a", 1, 2, b"")
    assert outbox.accept(["a"]) is None  # ended: the ID may come again


def test_a_half_closed_stream_ends_only_once_its_attempts_are_reported():
    outbox = Outbox()
    outbox.accept(["a"])
    outbox.close()
    outbox.started("a", 1)
    assert outbox.take() == {"a": [1, 0, b"", None, None]}
    taken: list[object] = []
    taker = threading.Thread(target=lambda: taken.append(outbox.take()))
    taker.start()
    outbox.ended("a", 1, 2, b"done")
    taker.join(10)
    assert taken == [{"a": [1, 2, b"done", None, None]}]
    assert outbox.take() is None


def test_updates_become_messages_split_by_size_with_times_and_outcomes(monkeypatch):
    monkeypatch.setattr(worker, "BATCH_BYTES", 10)
    error = worker_pb2.HandlerError(error_class=ErrorClass.ERROR_CLASS_NON_RETRYABLE)
    messages = list(responses({
        "a": [1_500_000_000_123_456_789, 1_500_000_001_000_000_000, b"x" * 11, None, None],
        "b": [1_500_000_000_000_000_000, 0, b"", None, None],
        "c": [1_500_000_000_000_000_000, 1_500_000_000_000_000_001, b"", error, None]}))
    assert [[u.attempt_id for u in m.updates] for m in messages] == [["a"], ["b", "c"]]
    a, b, c = (u for m in messages for u in m.updates)
    assert (a.start_time.seconds, a.start_time.nanos) == (1_500_000_000, 123_456_789)
    assert a.end_time.seconds == 1_500_000_001 and a.result == b"x" * 11
    assert not b.HasField("end_time") and b.WhichOneof("outcome") is None
    assert c.WhichOneof("outcome") == "error" and c.end_time.nanos == 1


@sdk.task
def returns(payload: bytes) -> object:
    return {"bytes": payload, "text": payload.decode(), "none": None}[
        sdk.current_attempt().function]


def attempt(function: str = "bytes") -> sdk.Attempt:
    return sdk.Attempt(tenant_id="t", task_id="x", function=function, attempt_number=1,
                       deadline=None)


def test_a_handlers_bytes_text_or_none_is_its_result():
    assert run_handler(returns, b"hi", attempt("bytes")) == b"hi"
    assert run_handler(returns, b"hi", attempt("text")) == b"hi"
    assert run_handler(returns, b"hi", attempt("none")) == b""


@pytest.mark.parametrize(("raised", "error_class", "code"), [
    (sdk.NonRetryableError("no"), ErrorClass.ERROR_CLASS_NON_RETRYABLE,
     code_pb2.FAILED_PRECONDITION),
    (sdk.ThrottledError("busy", retry_after=timedelta(seconds=2)),
     ErrorClass.ERROR_CLASS_THROTTLED, code_pb2.RESOURCE_EXHAUSTED),
    (ValueError("oops"), ErrorClass.ERROR_CLASS_RETRYABLE, code_pb2.UNKNOWN),
    (SystemExit(3), ErrorClass.ERROR_CLASS_RETRYABLE, code_pb2.UNKNOWN),
])
def test_a_handlers_exception_is_an_error_of_its_class_and_never_escapes(raised, error_class,
                                                                          code):
    def handler(payload: bytes) -> bytes:
        raise raised

    outcome = run_handler(handler, b"", attempt())
    assert isinstance(outcome, worker_pb2.HandlerError)
    assert (outcome.error_class, outcome.status.code) == (error_class, code)
    assert type(raised).__name__ in outcome.traceback
    if isinstance(raised, sdk.ThrottledError):
        assert outcome.retry_delay.seconds == 2


def test_a_result_too_large_for_a_message_is_a_non_retryable_error(monkeypatch):
    monkeypatch.setattr(worker, "MAX_RESULT_BYTES", 4)
    outcome = run_handler(lambda payload: b"12345", b"", attempt())
    assert isinstance(outcome, worker_pb2.HandlerError)
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert outcome.error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE


def assignment(handler: str, *, timeout: float | None = None) -> worker_pb2.AttemptAssignment:
    message = worker_pb2.AttemptAssignment(attempt_id="a", tenant_id="t", task_id="x",
                                           function="f", handler=handler, payload=b"p",
                                           attempt_number=2)
    if timeout is not None:
        message.timeout.FromTimedelta(timedelta(seconds=timeout))
    return message


def test_a_refused_handler_is_a_non_retryable_not_found_outcome():
    runtime = Worker(allowed_packages=("examples",), slots=1)
    for handler in ("subprocess:getoutput", "tests.handlers:flaky", "examples.demo:nothing"):
        outcome = runtime._call(assignment(handler), 0)
        assert isinstance(outcome, worker_pb2.HandlerError)
        assert outcome.status.code == code_pb2.NOT_FOUND
        assert outcome.error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE


leak: ContextVar[str | None] = ContextVar("leak", default=None)
LEAKS: list[object] = []


@sdk.task
def sets_a_context_variable(payload: bytes) -> bytes:
    LEAKS.append((leak.get(), sdk.current_attempt()))
    leak.set("left behind")
    return b""


def test_each_attempt_runs_in_a_fresh_context_with_its_deadline(monkeypatch):
    runtime = Worker(allowed_packages=("tests.unit",), slots=1)
    LEAKS.clear()
    handler = f"{__name__}:sets_a_context_variable"
    assert runtime._call(assignment(handler, timeout=1.5), 1_000_000_000) == b""
    assert runtime._call(assignment(handler), 0) == b""
    (first_leak, first), (second_leak, second) = LEAKS
    assert first_leak is None and second_leak is None
    assert first.attempt_number == 2
    assert first.deadline is not None and first.deadline.timestamp() == 2.5
    assert second.deadline is None
    assert leak.get() is None
