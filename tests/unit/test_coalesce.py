"""Group commit of single creates: overlapping calls of a tenant share a submission, and each
caller still gets its own answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.rpc import code_pb2, status_pb2
from opentelemetry import context as otel_context
from weir.v1 import tasks_pb2

from libs.errors import NotFound, Unavailable
from services.gateway.coalesce import Coalescer
from services.gateway.engine import Created

OK = status_pb2.Status(code=code_pb2.OK)


def request(function: str, payload: bytes = b"") -> tasks_pb2.CreateTaskRequest:
    return tasks_pb2.CreateTaskRequest(task=tasks_pb2.Task(function=function, payload=payload))


class Submissions:
    """A stand-in for `Submitter.create`: the first call blocks until released, so the calls
    behind it pile up; a request for function 'missing' fails its whole batch."""

    def __init__(self, *, fail_with: Exception | None = None) -> None:
        self.batches: list[list[bytes]] = []
        self.first_started = threading.Event()
        self.release_first = threading.Event()
        self.fail_with = fail_with

    def __call__(self, tenant_id: str, requests: Sequence[tasks_pb2.CreateTaskRequest],
                 parents: Sequence[otel_context.Context]) -> list[Created]:
        assert len(parents) == len(requests)  # each caller's trace goes with its request
        self.batches.append([r.task.payload for r in requests])
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.release_first.wait(10)
        if self.fail_with is not None and len(requests) > 1:
            raise self.fail_with
        if any(r.task.function == "missing" for r in requests):
            raise NotFound("task.function: function 'missing' not found")
        return [Created(tasks_pb2.Task(task_id=f"{tenant_id}-{r.task.payload.decode()}"), OK)
                for r in requests]


def pile_up(submissions: Submissions, coalescer: Coalescer,
            requests: list[tasks_pb2.CreateTaskRequest]) -> list:
    """Calls `create` for a first request, and for the others while the first is in flight."""
    with ThreadPoolExecutor(max_workers=len(requests) + 1) as pool:
        first = pool.submit(coalescer.create, "t1", request("echo", b"first"))
        assert submissions.first_started.wait(10)
        waiting = [pool.submit(coalescer.create, "t1", r) for r in requests]
        # Queued behind the submission in flight (which took the first out of the queue).
        deadline = time.monotonic() + 10
        while len(coalescer._queues.get("t1", [])) < len(requests) and \
                time.monotonic() < deadline:
            threading.Event().wait(0.001)
        submissions.release_first.set()
        outcomes = []
        for future in [first, *waiting]:
            try:
                outcomes.append(future.result(10))
            except Exception as exc:  # noqa: BLE001 - the caller's answer
                outcomes.append(exc)
        return outcomes


def test_a_lone_call_is_submitted_at_once_by_itself():
    submissions = Submissions()
    submissions.release_first.set()
    created = Coalescer(submissions).create("t1", request("echo", b"a"))
    assert created.task.task_id == "t1-a" and submissions.batches == [[b"a"]]


def test_calls_that_arrive_during_a_submission_go_together_in_the_next():
    submissions = Submissions()
    outcomes = pile_up(submissions, Coalescer(submissions),
                       [request("echo", str(i).encode()) for i in range(5)])
    assert [o.task.task_id for o in outcomes] == ["t1-first", *[f"t1-{i}" for i in range(5)]]
    assert submissions.batches == [[b"first"], [str(i).encode() for i in range(5)]]


def test_one_bad_entry_does_not_refuse_the_others():
    submissions = Submissions()
    outcomes = pile_up(submissions, Coalescer(submissions),
                       [request("echo", b"x"), request("missing", b"y"), request("echo", b"z")])
    assert outcomes[1].task.task_id == "t1-x" and outcomes[3].task.task_id == "t1-z"
    assert isinstance(outcomes[2], NotFound)
    assert [b"x", b"y", b"z"] in submissions.batches  # tried together first, then alone
    assert [b"y"] in submissions.batches


def test_an_outage_is_every_callers_answer():
    submissions = Submissions(fail_with=Unavailable("could not store the tasks"))
    outcomes = pile_up(submissions, Coalescer(submissions),
                       [request("echo", b"x"), request("echo", b"y")])
    assert outcomes[0].task.task_id == "t1-first"
    assert all(isinstance(o, Unavailable) for o in outcomes[1:])


def test_tenants_do_not_wait_for_each_other():
    submissions = Submissions()
    coalescer = Coalescer(submissions)
    with ThreadPoolExecutor(max_workers=2) as pool:
        blocked = pool.submit(coalescer.create, "t1", request("echo", b"slow"))
        assert submissions.first_started.wait(10)
        assert coalescer.create("t2", request("echo", b"b")).task.task_id == "t2-b"
        submissions.release_first.set()
        assert blocked.result(10).task.task_id == "t1-slow"


@pytest.mark.parametrize("callers", [40])
def test_many_overlapping_callers_each_get_their_own_task(callers):
    submissions = Submissions()
    submissions.release_first.set()
    coalescer = Coalescer(submissions)
    with ThreadPoolExecutor(max_workers=16) as pool:
        created = list(pool.map(lambda i: coalescer.create("t1", request("echo", str(i).encode())),
                                range(callers)))
    assert [c.task.task_id for c in created] == [f"t1-{i}" for i in range(callers)]
    assert sorted(p for batch in submissions.batches for p in batch) == sorted(
        str(i).encode() for i in range(callers))
    assert not coalescer._queues and not coalescer._busy
