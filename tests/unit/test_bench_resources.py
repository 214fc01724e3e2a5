"""The benchmark's resource meter counts a process together with its children."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.resources import ResourceMeter, snapshot

BUSY_CHILD = ("import sys, time\n"
              "end = time.process_time() + 0.3\n"
              "while time.process_time() < end: pass\n"
              "print('busy done', flush=True)\n"
              "sys.stdin.read()\n")


def test_a_process_is_counted_with_its_children(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "busy done\n"
        (tmp_path / "parent.pid").write_text(f"{os.getpid()}\n")
        (tmp_path / "child.pid").write_text(f"{child.pid}\n")
        (tmp_path / "gone.pid").write_text("999999999\n")
        usage = snapshot(tmp_path)
    finally:
        child.communicate("")
    assert set(usage) == {"parent", "child"}
    assert usage["child"].cpu_seconds >= 0.2  # ticks are sampled: allow a few
    assert usage["parent"].cpu_seconds >= usage["child"].cpu_seconds
    assert usage["parent"].rss_bytes > usage["child"].rss_bytes > 0


def test_the_meter_reports_cpu_per_task_and_peak_memory(tmp_path):
    (tmp_path / "self.pid").write_text(f"{os.getpid()}\n")
    with ResourceMeter(interval=0.01, run_dir=tmp_path) as meter:
        sum(i * i for i in range(300_000))
    report = meter.report(tasks=10)
    mine = report["processes"]["self"]
    assert mine["cpu_seconds"] > 0 and mine["peak_rss_mib"] > 0
    assert report["total_cpu_ms_per_task"] == round(mine["cpu_seconds"] * 100, 2)
