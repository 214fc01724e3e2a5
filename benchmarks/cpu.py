"""CPU time per operation, of an engine's JVM and of this Python process, read from /proc.

On a shared 2-core machine wall time says little (other processes take turns on the cores);
the CPU a process has used is counted by the kernel for that process alone. The engine's pid
comes from its pid file (``.var/run/<engine>.pid``, or ``$WEIR_BENCH_RUN_DIR`` for a second
checkout's engines) and is checked to be the process listening on the port being measured,
so the CPU of another pair of engines is never counted by mistake.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.resources import RUN_DIR, TICKS, proc_stat


def run_dir() -> Path:
    return Path(os.environ.get("WEIR_BENCH_RUN_DIR", RUN_DIR))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), from /proc/<pid>/stat."""
    stat = proc_stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return stat[1]


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1/0.0.0.0 ``port`` (state 0A is LISTEN)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def engine_pid(engine: str, port: int) -> int:
    """The pid of ``engine`` (kafka, cassandra) from its pid file, checked against ``port``."""
    pid_file = run_dir() / f"{engine}.pid"
    pid = int(pid_file.read_text().strip())
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    fd_dir = Path(f"/proc/{pid}/fd")
    if not any(os.readlink(fd_dir / fd) in wanted for fd in os.listdir(fd_dir)):
        raise RuntimeError(f"{engine} pid {pid} (from {pid_file}) does not listen on port {port}: "
                           "set WEIR_BENCH_RUN_DIR to the run directory of the engines measured")
    return pid


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU of each live thread of a process: {tid: (name, seconds)}."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = text[text.rindex(")") + 2:].split()
        name = text[text.index("(") + 1:text.rindex(")")]
        threads[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return threads


def thread_groups(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds between two `thread_cpu_seconds` by thread name, numbers stripped
    ("GC Thread#1" and "GC Thread#0" are "GC Thread"; the kernel keeps 15 characters)."""
    groups: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        used = seconds - before.get(tid, (name, 0.0))[1]
        if used > 0:
            group = name.rstrip("0123456789#:-_ ")
            groups[group] = groups.get(group, 0.0) + used
    return groups


@dataclass
class Cost:
    """CPU and wall time of a measured block, and the engine's CPU by thread: see `CpuMeter`."""

    engine_seconds: float = 0.0
    client_seconds: float = 0.0
    wall_seconds: float = 0.0
    engine_threads: dict[str, float] | None = None


class CpuMeter:
    """Measures the CPU an engine process and this process use inside a ``with`` block."""

    def __init__(self, engine_pid: int) -> None:
        self._pid = engine_pid
        self.cost = Cost()

    def __enter__(self) -> CpuMeter:
        self._threads = thread_cpu_seconds(self._pid)
        self._engine = process_cpu_seconds(self._pid)
        self._client = time.process_time()  # every thread of this process (driver IO too)
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cost = Cost(engine_seconds=process_cpu_seconds(self._pid) - self._engine,
                         client_seconds=time.process_time() - self._client,
                         wall_seconds=time.perf_counter() - self._wall,
                         engine_threads=thread_groups(self._threads,
                                                      thread_cpu_seconds(self._pid)))


def settle(pid: int, *, below_ms_per_second: float = 60.0, timeout_seconds: float = 60.0) -> None:
    """Waits until a process is nearly idle: schema changes make Cassandra flush and compact
    its schema tables for a while, which must not be counted against the first measure."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        began = process_cpu_seconds(pid)
        time.sleep(2.0)
        if (process_cpu_seconds(pid) - began) * 1000 / 2.0 < below_ms_per_second:
            return


def idle_ms_per_second(pid: int, seconds: float = 10.0) -> float:
    """CPU milliseconds per second a process uses while nothing is asked of it (its
    housekeeping), which every per-operation figure includes for the length of its run."""
    began = process_cpu_seconds(pid)
    time.sleep(seconds)
    return round((process_cpu_seconds(pid) - began) * 1000 / seconds, 1)
