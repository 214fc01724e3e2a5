"""A pool of worker processes, one attempt at a time each (the process is the isolation)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from weir.v1 import worker_pb2_grpc

from libs.healthcheck import is_serving

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """One worker process serving the worker protocol on a unix socket."""

    def __init__(self, *, index: int, socket_dir: Path) -> None:
        self.index = index
        self.socket = socket_dir / f"worker-{index}.sock"
        self.address = f"unix://{self.socket}"
        self.process: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub: worker_pb2_grpc.WorkerServiceStub | None = None

    def start(self, *, timeout_seconds: float = 60.0) -> None:
        self.socket.unlink(missing_ok=True)  # a killed predecessor leaves its socket behind
        # --parent-pid: the worker exits when this process is gone, even after a kill -9.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "libs.sdk.worker", "--address", self.address,
             "--parent-pid", str(os.getpid())], cwd=ROOT)
        deadline = time.monotonic() + timeout_seconds
        while not is_serving(self.address, timeout_seconds=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.index} did not start")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def terminate(self) -> None:
        """Stops the process at once (a lost attempt); the pool replaces the worker when its
        call fails."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def kill(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class WorkerPool:
    """Hands out idle workers; replaces a worker that crashed or had to be stopped."""

    def __init__(self, *, size: int, socket_dir: Path) -> None:
        socket_dir.mkdir(parents=True, exist_ok=True)
        self._workers = [WorkerProcess(index=i, socket_dir=socket_dir) for i in range(size)]
        self._idle: list[WorkerProcess] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self._workers)) as starting:
            list(starting.map(lambda w: w.start(), self._workers))
        self._idle = list(self._workers)

    @property
    def capacity(self) -> int:
        return len(self._workers)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._workers) - len(self._idle)

    def acquire(self) -> WorkerProcess | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def release(self, worker: WorkerProcess) -> None:
        with self._lock:
            self._idle.append(worker)

    def replace(self, worker: WorkerProcess) -> None:
        """Kills the worker (stuck or dead) and starts a fresh one in its slot, then idles it."""
        worker.kill()
        try:
            worker.start()
        except RuntimeError:
            log.exception("a worker could not be restarted; its slot stays empty")
            return
        self.release(worker)

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
