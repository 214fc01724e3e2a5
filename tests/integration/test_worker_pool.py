"""The executor-manager's worker pool with real worker processes: every attempt reported once,
concurrency per function, timeouts, cancels and crashes that kill a process and replace it,
the worker protocol's authentication, refused handlers, and the sandbox. No engines needed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2
from weir.v1 import common_pb2, tasks_pb2
from weir.worker.v1 import worker_pb2, worker_pb2_grpc

from libs.healthcheck import is_serving
from services.executor_manager.pool import (
    AttemptResult,
    AttemptSpec,
    PoolClosed,
    WorkerPool,
    WorkerProcess,
    WorkerSandbox,
)
from tests.helpers import eventually, unique

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = WorkerSandbox(handler_packages="examples,tests.handlers", memory_mb=2048,
                        cpu_seconds=3600, open_files=256, max_processes=512,
                        user="weir-worker")
Exit = tasks_pb2.ExitReason
ErrorClass = common_pb2.ErrorClass


def fresh_socket_dir() -> Path:
    # Not tmp_path: pytest's base directory is closed to the worker user.
    return Path(tempfile.mkdtemp(prefix="weir-workers-"))


class Reports:
    """What a pool reported, by attempt: every start and every result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.starts: dict[str, list[datetime]] = {}
        self.results: dict[str, list[AttemptResult]] = {}
        self.calls = 0  # of on_done
        self.threads: set[str] = set()

    def on_start(self, attempt_id: str, at: datetime) -> None:
        with self._lock:
            assert attempt_id not in self.results, "a start after the end"
            self.starts.setdefault(attempt_id, []).append(at)
            self.threads.add(threading.current_thread().name)

    def on_done(self, results: Sequence[AttemptResult]) -> None:
        with self._lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            for result in results:
                self.results.setdefault(result.attempt_id, []).append(result)

    def wait(self, attempt_ids: Sequence[str], timeout: float = 60) -> dict[str, AttemptResult]:
        """The results of the attempts once all are reported."""
        def reported() -> bool:
            with self._lock:
                missing = [a for a in attempt_ids if a not in self.results]
            assert not missing, f"{len(missing)} not reported, e.g. {missing[:3]}"
            return True

        eventually(reported, timeout=timeout, interval=0.02, message="every result")
        with self._lock:
            return {a: self.results[a][0] for a in attempt_ids}


def spec(handler: str, payload: bytes = b"", *, tenant: str = "tenant", function: str = "",
         timeout: float = 60, concurrency: int = 1, attempt_id: str = "") -> AttemptSpec:
    task_id = unique("task")
    return AttemptSpec(attempt_id=attempt_id or f"{task_id}/1", tenant_id=tenant,
                       task_id=task_id, function=function or handler.rpartition(":")[2],
                       handler=handler, payload=payload, attempt_number=1,
                       timeout=timedelta(seconds=timeout), concurrency=concurrency)


def echo(payload: bytes, **kwargs: object) -> AttemptSpec:
    return spec("examples.demo:echo", payload, **kwargs)  # type: ignore[arg-type]


def sleeper(ms: int, **kwargs: object) -> AttemptSpec:
    return spec("examples.demo:sleep", str(ms).encode(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = fresh_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Running:
    pool: WorkerPool
    reports: Reports


def running_pool(socket_dir: Path, *, size: int = 1, slots: int = 1,
                 sandbox: WorkerSandbox = SANDBOX) -> Running:
    reports = Reports()
    pool = WorkerPool(size=size, slots=slots, socket_dir=socket_dir, sandbox=sandbox,
                      on_done=reports.on_done, on_start=reports.on_start)
    pool.start()
    return Running(pool, reports)


@pytest.fixture(scope="module")
def shared() -> Iterator[Running]:
    """Two workers of four slots for the tests that leave them as they found them."""
    socket_dir = fresh_socket_dir()
    running = running_pool(socket_dir, size=2, slots=4)
    yield running
    running.pool.close()
    shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def own(socket_dir: Path) -> Iterator[Running]:
    """One worker of two slots, for a test that kills it."""
    running = running_pool(socket_dir, size=1, slots=2)
    yield running
    running.pool.close()


def pids(pool: WorkerPool) -> set[int]:
    return {w.pid for w in pool.workers if w.pid is not None}


# -- running attempts ---------------------------------------------------------------------


def test_two_thousand_echo_attempts_are_each_reported_once_with_their_result(shared):
    specs = [echo(f"hello {i}".encode(), concurrency=4) for i in range(2000)]
    for start in range(0, len(specs), 250):  # in batches, as dispatchers deliver them
        shared.pool.submit(specs[start:start + 250])
    results = shared.reports.wait([s.attempt_id for s in specs])

    for s in specs:
        result = results[s.attempt_id]
        assert len(shared.reports.results[s.attempt_id]) == 1
        assert result.succeeded and result.exit_reason == Exit.EXIT_REASON_RETURNED
        assert result.result == s.payload
        assert shared.reports.starts[s.attempt_id] == [result.start_time]
        assert result.start_time <= result.end_time
    assert shared.reports.calls < 2000  # reported in batches
    assert shared.reports.threads == {"pool-notifier"}
    eventually(lambda: shared.pool.in_flight == 0, message="nothing held")
    assert not set(shared.pool.running()) & {s.attempt_id for s in specs}


def test_a_function_never_runs_more_than_its_concurrency_on_one_worker(shared):
    tenant = unique("tenant")
    limited = [spec("tests.handlers:overlap", b"40", tenant=tenant, function="limited",
                    concurrency=2) for _ in range(16)]
    free = [spec("tests.handlers:overlap", b"40", tenant=tenant, function="free",
                 concurrency=4) for _ in range(8)]
    shared.pool.submit(limited + free)
    # Placed at once: two of `limited` per worker, the rest of the slots to `free`.
    assert shared.pool.queued == len(limited) - 4 + len(free) - 4
    results = shared.reports.wait([s.attempt_id for s in limited + free])

    inside = [json.loads(results[s.attempt_id].result)["inside"] for s in limited]
    assert max(inside) == 2
    assert all(json.loads(results[s.attempt_id].result)["inside"] <= 4 for s in free)


def test_each_attempt_sees_its_own_current_attempt_and_a_fresh_context(shared):
    specs = [spec("tests.handlers:whoami", b"20", tenant=unique("tenant"), timeout=30,
                  concurrency=4) for _ in range(24)]
    shared.pool.submit(specs)
    results = shared.reports.wait([s.attempt_id for s in specs])

    for s in specs:
        seen = json.loads(results[s.attempt_id].result)
        assert (seen["tenant_id"], seen["task_id"], seen["function"],
                seen["attempt_number"]) == (s.tenant_id, s.task_id, s.function, 1)
        assert seen["leaked"] is None
        deadline = datetime.fromisoformat(seen["deadline"])
        assert deadline - results[s.attempt_id].start_time == timedelta(seconds=30)


def test_a_handler_error_is_reported_raised_with_its_class_and_requested_delay(shared):
    throttled = spec("tests.handlers:flaky", json.dumps(
        {"succeed_on": 2, "error": "THROTTLED", "retry_after": 3}).encode())
    bad_input = spec("tests.handlers:strict", b"bad")
    shared.pool.submit([throttled, bad_input])
    results = shared.reports.wait([throttled.attempt_id, bad_input.attempt_id])

    first = results[throttled.attempt_id]
    assert first.exit_reason == Exit.EXIT_REASON_RAISED
    assert first.error_class == ErrorClass.ERROR_CLASS_THROTTLED
    assert first.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert first.retry_delay == timedelta(seconds=3)
    assert "fails on purpose" in first.traceback
    second = results[bad_input.attempt_id]
    assert second.error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE
    assert second.status.message == "bad input b'bad'"


@pytest.fixture
def marker() -> Iterator[Path]:
    """A file a refused handler would create if it ran (in /tmp, writable by any user)."""
    path = Path(tempfile.gettempdir()) / unique("weir-never-ran")
    yield path
    path.unlink(missing_ok=True)


def test_a_refused_handler_ends_non_retryable_not_found_and_never_runs(shared, marker):
    refused = [spec("subprocess:getoutput", f"touch {marker}".encode()),
               spec("tests.handlers:unmarked", str(marker).encode())]
    shared.pool.submit(refused)
    results = shared.reports.wait([s.attempt_id for s in refused])

    for s in refused:
        result = results[s.attempt_id]
        assert result.exit_reason == Exit.EXIT_REASON_RAISED
        assert result.error_class == ErrorClass.ERROR_CLASS_NON_RETRYABLE
        assert result.status.code == code_pb2.NOT_FOUND
        assert s.handler in result.status.message
    assert not marker.exists()
    check = echo(b"still here")
    shared.pool.submit([check])
    assert shared.reports.wait([check.attempt_id])[check.attempt_id].result == b"still here"


def test_a_repeated_attempt_id_is_refused_and_nothing_of_the_batch_is_taken(shared):
    first = echo(b"one")
    shared.pool.submit([first])
    shared.reports.wait([first.attempt_id])
    fresh = echo(b"fresh")
    twice = echo(b"two")
    with pytest.raises(ValueError):
        shared.pool.submit([fresh, twice, twice])
    assert fresh.attempt_id not in shared.pool.running()


# -- stopping attempts ----------------------------------------------------------------------


def test_an_attempt_past_its_timeout_is_timed_out_and_its_worker_replaced(own):
    pool, reports = own.pool, own.reports
    before = pids(pool)
    stuck = sleeper(60_000, timeout=1, concurrency=2)
    beside = sleeper(60_000, timeout=60, concurrency=2)
    pool.submit([stuck, beside])
    results = reports.wait([stuck.attempt_id, beside.attempt_id], timeout=30)

    timed_out = results[stuck.attempt_id]
    assert timed_out.exit_reason == Exit.EXIT_REASON_TIMED_OUT
    assert timed_out.status.code == code_pb2.DEADLINE_EXCEEDED
    assert timed_out.error_class == ErrorClass.ERROR_CLASS_RETRYABLE
    assert timedelta(seconds=1) <= timed_out.end_time - timed_out.start_time < timedelta(
        seconds=10)
    crashed = results[beside.attempt_id]
    assert crashed.exit_reason == Exit.EXIT_REASON_WORKER_CRASHED
    assert stuck.attempt_id not in crashed.status.message  # never another attempt's name
    eventually(lambda: pids(pool) and pids(pool) != before, message="a fresh worker")
    after = echo(b"after")
    pool.submit([after])
    assert reports.wait([after.attempt_id])[after.attempt_id].result == b"after"


def test_cancel_stops_a_running_attempt_now_and_reports_it_cancelled(own):
    pool, reports = own.pool, own.reports
    before = pids(pool)
    target, beside, queued = (sleeper(60_000, concurrency=2) for _ in range(3))
    # Two slots: the third waits in the pool.
    pool.submit([target, beside, queued])
    eventually(lambda: {target.attempt_id, beside.attempt_id} <= set(reports.starts),
               message="two attempts running")
    assert pool.queued == 1

    assert pool.cancel(queued.attempt_id)
    assert pool.cancel(target.attempt_id)
    results = reports.wait([target.attempt_id, beside.attempt_id, queued.attempt_id],
                           timeout=15)
    assert results[queued.attempt_id].exit_reason == Exit.EXIT_REASON_CANCELLED
    assert results[queued.attempt_id].start_time is None
    cancelled = results[target.attempt_id]
    assert cancelled.exit_reason == Exit.EXIT_REASON_CANCELLED
    assert cancelled.status.code == code_pb2.CANCELLED
    assert cancelled.start_time is not None
    assert results[beside.attempt_id].exit_reason == Exit.EXIT_REASON_WORKER_CRASHED
    assert not pool.cancel(target.attempt_id)  # reported already
    assert not pool.cancel("no-such-attempt")
    eventually(lambda: pids(pool) and pids(pool) != before, message="a fresh worker")


def test_a_worker_that_dies_ends_its_attempts_worker_crashed_and_the_pool_goes_on(own):
    pool, reports = own.pool, own.reports
    before = pids(pool)
    beside = sleeper(60_000)
    pool.submit([beside])
    eventually(lambda: beside.attempt_id in reports.starts, message="the first one running")
    crash = spec("tests.handlers:crash", b"3")
    pool.submit([crash])
    results = reports.wait([beside.attempt_id, crash.attempt_id], timeout=15)

    for s in (beside, crash):
        result = results[s.attempt_id]
        assert result.exit_reason == Exit.EXIT_REASON_WORKER_CRASHED
        assert result.error_class == ErrorClass.ERROR_CLASS_RETRYABLE
        assert result.status.code == code_pb2.UNAVAILABLE
        assert "exit status 3" in result.status.message
    eventually(lambda: pids(pool) and pids(pool) != before, message="a fresh worker")
    after = [echo(b"after") for _ in range(4)]
    pool.submit(after)
    assert all(r.result == b"after" for r in reports.wait([s.attempt_id for s in after]
                                                          ).values())


def test_attempts_queued_while_a_worker_restarts_run_once_it_is_back(own):
    pool, reports = own.pool, own.reports
    pool.submit([spec("tests.handlers:crash", b"1")])
    waiting = [echo(str(i).encode()) for i in range(10)]
    pool.submit(waiting)  # no live worker for a moment: they wait in the pool
    results = reports.wait([s.attempt_id for s in waiting], timeout=60)
    ended = {r.exit_reason for r in results.values()}
    # Those sent to the dying process crash; the others run on its replacement.
    assert ended <= {Exit.EXIT_REASON_RETURNED, Exit.EXIT_REASON_WORKER_CRASHED}
    assert Exit.EXIT_REASON_RETURNED in ended


def test_drain_takes_no_more_attempts_and_waits_for_those_held(own):
    pool, reports = own.pool, own.reports
    held = [sleeper(300) for _ in range(3)]
    pool.submit(held)
    assert pool.drain(timedelta(seconds=30))
    assert set(reports.results) >= {s.attempt_id for s in held}
    with pytest.raises(PoolClosed):
        pool.submit([echo(b"late")])
    assert pool.in_flight == 0


# -- the worker protocol --------------------------------------------------------------------


def run_request(*attempt_ids: str) -> worker_pb2.RunRequest:
    request = worker_pb2.RunRequest()
    for attempt_id in attempt_ids:
        request.attempts.add(attempt_id=attempt_id, tenant_id="t", task_id="x",
                             function="echo", handler="examples.demo:echo", payload=b"hi")
    return request


def test_a_call_without_the_token_is_unauthenticated(shared):
    worker = shared.pool.workers[0]
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            # Not even a request sent: the refusal must not wait for one.
            list(stub.Run(iter(()), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Run(iter([run_request("a")]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Bearer ", "Basic x", ""])
def test_a_call_with_another_token_is_unauthenticated(shared, header):
    worker = shared.pool.workers[0]
    metadata = [("authorization", header)]
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for call in (lambda: list(stub.Run(iter([run_request("a")]), timeout=10,
                                           metadata=metadata)),
                     lambda: stub.Describe(worker_pb2.DescribeRequest(), timeout=10,
                                           metadata=metadata)):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_pools_stub_carries_the_token_and_health_checks_need_none(shared):
    worker = shared.pool.workers[0]
    described = worker.stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
    assert described.max_concurrency == 4
    assert is_serving(worker.address)


def test_a_stream_of_its_own_runs_attempts_and_ends_once_the_caller_half_closes(shared):
    worker = shared.pool.workers[0]
    updates = [u for response in worker.stub.Run(iter([run_request("a", "b"),
                                                       run_request("c")]), timeout=30)
               for u in response.updates]
    ended = {u.attempt_id: u.result for u in updates if u.HasField("end_time")}
    assert ended == {"a": b"hi", "b": b"hi", "c": b"hi"}
    assert all(u.HasField("start_time") for u in updates)


def test_a_repeated_attempt_id_on_a_stream_is_invalid_argument(shared):
    worker = shared.pool.workers[0]
    with pytest.raises(grpc.RpcError) as refused:
        list(worker.stub.Run(iter([run_request("dup", "dup")]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the sandbox ----------------------------------------------------------------------------


def test_the_token_is_neither_in_the_command_line_nor_in_the_environment(shared):
    worker = shared.pool.workers[0]
    token = worker.token.encode()
    assert len(token) >= 43  # 256 bits in URL-safe base64
    proc = Path(f"/proc/{worker.pid}")
    assert token not in (proc / "cmdline").read_bytes()
    try:
        environ = (proc / "environ").read_bytes()
    except PermissionError:
        pytest.skip("the worker's environment is readable by root only (it is undumpable)")
    assert token not in environ
    assert b"WEIR_" not in environ


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches workers to another user")
def test_another_process_of_the_worker_user_cannot_read_a_workers_memory_or_environment(
        shared):
    worker = shared.pool.workers[0]
    as_worker_user = ["setpriv", f"--reuid={SANDBOX.user}", f"--regid={SANDBOX.user}",
                      "--clear-groups"]
    for name in ("environ", "mem", "maps"):
        peek = subprocess.run([*as_worker_user, "head", "-c", "1",
                               f"/proc/{worker.pid}/{name}"], capture_output=True)
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr, name


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches workers to another user")
def test_a_socket_directory_the_worker_user_cannot_reach_is_refused_at_once(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="cannot reach"):
        WorkerPool(size=1, slots=1, socket_dir=closed / "sockets", sandbox=SANDBOX,
                   on_done=lambda results: None)


def test_a_worker_past_half_of_its_cpu_time_limit_is_replaced_once_it_has_no_attempts(
        socket_dir):
    running = running_pool(socket_dir, sandbox=dataclasses.replace(SANDBOX, cpu_seconds=2))
    pool, reports = running.pool, running.reports
    try:
        (first,) = pids(pool)
        spin = spec("tests.handlers:spin", b"1.1")
        pool.submit([spin])
        spun = reports.wait([spin.attempt_id], timeout=30)[spin.attempt_id]
        assert int(spun.result) == first  # the pid as the worker sees it: the same process
        eventually(lambda: pids(pool) and pids(pool) != {first}, timeout=30,
                   message="a fresh worker")
        after = echo(b"after")
        pool.submit([after])
        assert reports.wait([after.attempt_id])[after.attempt_id].result == b"after"
    finally:
        pool.close()


# An executor-manager in miniature: a pool of one, its worker's pid on stdout, then waiting.
MANAGER = """
import sys, threading
from pathlib import Path
from services.executor_manager.pool import WorkerPool, WorkerSandbox
sandbox = WorkerSandbox(handler_packages="examples", memory_mb=2048, cpu_seconds=3600,
                        open_files=256, max_processes=512, user="weir-worker")
pool = WorkerPool(size=1, slots=2, socket_dir=Path(sys.argv[1]), sandbox=sandbox,
                  on_done=lambda results: None)
pool.start()
print(pool.workers[0].pid, flush=True)
threading.Event().wait()
"""


def exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # dead, waiting for whoever adopted it to reap it


def test_a_worker_exits_when_its_executor_manager_is_killed(socket_dir):
    manager = subprocess.Popen([sys.executable, "-c", MANAGER, str(socket_dir)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert manager.stdout is not None
        worker_pid = int(manager.stdout.readline())
        stat = Path(f"/proc/{worker_pid}/stat").read_text().rpartition(")")[2].split()
        assert int(stat[1]) == manager.pid  # its real parent, not a launcher in between
        manager.send_signal(signal.SIGKILL)
        manager.wait()
        eventually(lambda: exited(worker_pid), timeout=15, message="the orphaned worker gone")
    finally:
        manager.kill()
        manager.wait()


def test_without_root_a_worker_keeps_the_user_but_gets_limits_and_a_scrubbed_environment(
        socket_dir, monkeypatch):
    monkeypatch.setattr(WorkerSandbox, "switches_user", property(lambda self: False))
    monkeypatch.setenv("WEIR_SECRET_SETTING", "x")
    running = running_pool(socket_dir)
    try:
        hi = echo(b"hi")
        running.pool.submit([hi])
        assert running.reports.wait([hi.attempt_id])[hi.attempt_id].result == b"hi"
        worker: WorkerProcess = running.pool.workers[0]
        proc = Path(f"/proc/{worker.pid}")
        assert (proc / "status").read_text().count(f"Uid:\t{os.getuid()}\t") == 1
        limits = (proc / "limits").read_text()
        assert "Max address space         2147483648           2147483648" in limits
        assert "Max cpu time              3600                 3600" in limits
        assert "Max open files            256                  256" in limits
        environ = dict(line.split("=", 1) for line in
                       (proc / "environ").read_text().split("\0") if line)
        assert set(environ) == {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONPATH",
                                "PYTHONNOUSERSITE", "MALLOC_ARENA_MAX"}
        assert environ["HOME"] == str(worker.home)
    finally:
        running.pool.close()


def test_results_and_starts_are_never_reported_after_close(socket_dir):
    running = running_pool(socket_dir)
    held = sleeper(60_000)
    running.pool.submit([held])
    eventually(lambda: held.attempt_id in running.reports.starts, message="running")
    running.pool.close()
    assert held.attempt_id not in running.reports.results
    with pytest.raises(PoolClosed):
        running.pool.submit([echo(b"late")])

