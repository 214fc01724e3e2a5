"""The executor-manager's worker pool with real worker processes: the worker protocol
authenticates its caller, refuses handlers outside the allowed packages, and a worker that has
used half of its CPU-time limit is replaced. No engines needed."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from weir.v1 import worker_pb2, worker_pb2_grpc

from libs.healthcheck import is_serving
from services.executor_manager.pool import WorkerPool, WorkerProcess, WorkerSandbox
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = WorkerSandbox(handler_packages="examples,tests.handlers", memory_mb=2048,
                        cpu_seconds=3600, open_files=256, max_processes=512,
                        user="weir-worker")


def fresh_socket_dir() -> Path:
    # Not tmp_path: pytest's base directory is closed to the worker user.
    return Path(tempfile.mkdtemp(prefix="weir-workers-"))


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = fresh_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    """One worker for the tests that leave it as they found it."""
    socket_dir = fresh_socket_dir()
    pool = WorkerPool(size=1, socket_dir=socket_dir, sandbox=SANDBOX)
    pool.start()
    idle = pool.acquire()
    assert idle is not None
    yield idle
    pool.close()
    shutil.rmtree(socket_dir, ignore_errors=True)


def echo(payload: bytes) -> worker_pb2.ExecuteRequest:
    return worker_pb2.ExecuteRequest(handler="examples.demo:echo", payload=payload)


def test_a_call_without_the_token_is_unauthenticated(worker):
    with grpc.insecure_channel(worker.address) as channel, \
            pytest.raises(grpc.RpcError) as refused:
        worker_pb2_grpc.WorkerServiceStub(channel).Execute(echo(b"hi"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Bearer ", "Basic x", ""])
def test_a_call_with_another_token_is_unauthenticated(worker, header):
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for call in (lambda: stub.Execute(echo(b"hi"), timeout=10, metadata=[
                         ("authorization", header)]),
                     lambda: stub.Describe(worker_pb2.DescribeRequest(), timeout=10,
                                           metadata=[("authorization", header)])):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_pools_stub_carries_the_token_and_health_checks_need_none(worker):
    assert worker.stub.Execute(echo(b"hi"), timeout=10).result == b"hi"
    assert is_serving(worker.address)


def test_the_worker_refuses_a_handler_outside_its_packages_with_not_found(worker):
    for handler in ("subprocess:getoutput", "tests.handlers:unmarked"):
        with pytest.raises(grpc.RpcError) as refused:
            worker.stub.Execute(worker_pb2.ExecuteRequest(handler=handler, payload=b"id"),
                                timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert handler in refused.value.details()


def test_the_token_is_neither_in_the_command_line_nor_in_the_environment(worker):
    token = worker.token.encode()
    assert len(token) >= 43  # 256 bits in URL-safe base64
    proc = Path(f"/proc/{worker.process.pid}")
    assert token not in (proc / "cmdline").read_bytes()
    try:
        environ = (proc / "environ").read_bytes()
    except PermissionError:
        pytest.skip("the worker's environment is readable by root only (it is undumpable)")
    assert token not in environ
    assert b"WEIR_" not in environ


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches workers to another user")
def test_another_process_of_the_worker_user_cannot_read_a_workers_memory_or_environment(
        worker):
    as_worker_user = ["setpriv", f"--reuid={SANDBOX.user}", f"--regid={SANDBOX.user}",
                      "--clear-groups"]
    for name in ("environ", "mem", "maps"):
        peek = subprocess.run([*as_worker_user, "head", "-c", "1",
                               f"/proc/{worker.process.pid}/{name}"], capture_output=True)
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr, name


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches workers to another user")
def test_a_socket_directory_the_worker_user_cannot_reach_is_refused_at_once(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="cannot reach"):
        WorkerPool(size=1, socket_dir=closed / "sockets", sandbox=SANDBOX)


def test_a_worker_past_half_of_its_cpu_time_limit_is_replaced_after_its_attempt(socket_dir):
    sandbox = dataclasses.replace(SANDBOX, cpu_seconds=2)
    pool = WorkerPool(size=1, socket_dir=socket_dir, sandbox=sandbox)
    pool.start()
    try:
        worker = pool.acquire()
        first = worker.process.pid
        spun = worker.stub.Execute(worker_pb2.ExecuteRequest(
            handler="tests.handlers:spin", payload=b"1.1"), timeout=30)
        assert int(spun.result) == first  # the pid as the worker sees it: the same process
        pool.release(worker)

        def replaced() -> WorkerProcess:
            fresh = pool.acquire()
            assert fresh is not None, "the slot is still being refilled"
            return fresh

        fresh = eventually(replaced, timeout=30, message="a fresh worker")
        assert fresh.process.pid != first
        assert fresh.stub.Execute(echo(b"after"), timeout=10).result == b"after"
    finally:
        pool.close()


# An executor-manager in miniature: a pool of one, its worker's pid on stdout, then waiting.
MANAGER = """
import sys, threading
from pathlib import Path
from services.executor_manager.pool import WorkerPool, WorkerSandbox
sandbox = WorkerSandbox(handler_packages="examples", memory_mb=2048, cpu_seconds=3600,
                        open_files=256, max_processes=512, user="weir-worker")
pool = WorkerPool(size=1, socket_dir=Path(sys.argv[1]), sandbox=sandbox)
pool.start()
print(pool.acquire().process.pid, flush=True)
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
    pool = WorkerPool(size=1, socket_dir=socket_dir, sandbox=SANDBOX)
    pool.start()
    try:
        worker = pool.acquire()
        assert worker.stub.Execute(echo(b"hi"), timeout=10).result == b"hi"
        proc = Path(f"/proc/{worker.process.pid}")
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
        pool.close()
