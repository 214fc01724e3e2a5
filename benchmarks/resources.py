"""CPU time and memory of the running suite, read from /proc: the "resource use" of a run.

Each process named by a pid file in ``.var/run`` (the five services, Kafka, Cassandra) is
counted with every process below it — the executor-manager's worker processes count as the
executor-manager's.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

RUN_DIR = Path(__file__).resolve().parent.parent / ".var" / "run"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    rss_bytes: int


def proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, resident bytes) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    ppid, utime, stime, rss = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[21])
    return ppid, (utime + stime) / TICKS, rss * PAGE


def snapshot(run_dir: Path = RUN_DIR) -> dict[str, Usage]:
    """Usage of each pid-file process and its descendants, by name."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := proc_stat(int(p)))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    usage = {}
    for pid_file in sorted(run_dir.glob("*.pid")):
        try:
            root = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        tree, cpu, rss = [root], 0.0, 0
        while tree:
            pid = tree.pop()
            if pid in stats:
                cpu += stats[pid][1]
                rss += stats[pid][2]
                tree.extend(children.get(pid, ()))
        if root in stats:
            usage[pid_file.stem] = Usage(cpu, rss)
    return usage


class ResourceMeter:
    """CPU used by each process inside the ``with`` block, and its peak memory (sampled
    every ``interval`` seconds)."""

    def __init__(self, *, interval: float = 0.5, run_dir: Path = RUN_DIR) -> None:
        self._interval = interval
        self._run_dir = run_dir
        self._stopped = threading.Event()
        self._peak_rss: dict[str, int] = {}
        self._begin: dict[str, Usage] = {}
        self._end: dict[str, Usage] = {}
        self._thread = threading.Thread(target=self._sample, name="resource-meter", daemon=True)

    def __enter__(self) -> ResourceMeter:
        self._begin = self._observe()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join()
        self._end = self._observe()

    def report(self, *, tasks: int) -> dict:
        """Per process: CPU milliseconds per task and peak resident MiB; and the total."""
        processes = {}
        for name, end in self._end.items():
            begin = self._begin.get(name)
            if begin is None:
                continue  # started during the run: not comparable
            cpu = end.cpu_seconds - begin.cpu_seconds
            processes[name] = {"cpu_seconds": round(cpu, 2),
                               "cpu_ms_per_task": round(cpu * 1000 / max(tasks, 1), 2),
                               "peak_rss_mib": round(self._peak_rss[name] / 2**20)}
        total = sum(p["cpu_seconds"] for p in processes.values())
        return {"tasks": tasks, "processes": processes,
                "total_cpu_ms_per_task": round(total * 1000 / max(tasks, 1), 2)}

    def _observe(self) -> dict[str, Usage]:
        usage = snapshot(self._run_dir)
        for name, u in usage.items():
            self._peak_rss[name] = max(self._peak_rss.get(name, 0), u.rss_bytes)
        return usage

    def _sample(self) -> None:
        while not self._stopped.wait(self._interval):
            self._observe()
