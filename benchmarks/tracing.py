"""What tracing costs: CPU per task (every process, engines and Jaeger included) and the drain
rate of a backlog of echo tasks, with

- ``off``: no exporter (trace ids made and carried, no span recorded),
- ``default``: exported to the local Jaeger at the default sampling ratio,
- ``all``: every task traced (WEIR_TRACE_SAMPLE_RATIO=1).

Runs against the suite `make run` started: it restarts the five services
(deploy/local/services.sh) with each setting in turn, WEIR_BENCH_TRACING_ROUNDS rounds (2)
of WEIR_BENCH_TRACING_TASKS tasks (5,000) each, settings alternating so that a drift of the
machine's speed hits all of them alike; then restarts them as they were. Figures go to
``bench-results/tracing.json``.
"""

from __future__ import annotations

import os
import statistics
import subprocess

from benchmarks.common import GATEWAY, bench_tenant, header, save
from benchmarks.pipeline import ROOT, Outcomes, drain
from benchmarks.resources import ResourceMeter
from libs import config as weir_config
from libs.cassandra.session import close, connect
from libs.sdk import Client

MODES = {"off": {"WEIR_OTLP_ENDPOINT": ""}, "default": {},
         "all": {"WEIR_TRACE_SAMPLE_RATIO": "1"}}
SERVICES = ROOT / "deploy/local/services.sh"


def restart(overrides: dict[str, str]) -> None:
    env = {**os.environ, **overrides}
    subprocess.run([SERVICES, "stop"], check=True, capture_output=True)
    subprocess.run([SERVICES, "start"], check=True, capture_output=True, env=env)


def main() -> None:
    config = weir_config.load()
    session = connect(config)
    tenant_id, api_key = bench_tenant(session)
    tasks = int(os.environ.get("WEIR_BENCH_TRACING_TASKS", "5000"))
    rounds = int(os.environ.get("WEIR_BENCH_TRACING_ROUNDS", "2"))
    threads = int(os.environ.get("WEIR_BENCH_THREADS", "4"))
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    outcomes = Outcomes(config, tenant_id)
    try:
        for _ in range(rounds):
            for mode, overrides in MODES.items():
                restart(overrides)
                with Client(GATEWAY, api_key=api_key, timeout=120) as client:
                    drain(client, outcomes, 200, threads)  # warm: routes, workers, caches
                    with ResourceMeter() as use:
                        drained = drain(client, outcomes, tasks, threads)
                report = use.report(tasks=tasks)
                run = {"per_second": drained["per_second"],
                       "cpu_ms_per_task": report["total_cpu_ms_per_task"],
                       "processes": {name: p["cpu_ms_per_task"]
                                     for name, p in report["processes"].items()}}
                runs[mode].append(run)
                print(mode, run, flush=True)
    finally:
        outcomes.close()
        close(session)
        restart({})
    result = header()
    result["tasks_per_run"] = tasks
    result["default_sample_ratio"] = weir_config.WeirConfig().trace_sample_ratio
    result["modes"] = {
        mode: {"runs": done,
               "mean_cpu_ms_per_task": round(statistics.fmean(r["cpu_ms_per_task"]
                                                              for r in done), 2),
               "mean_per_second": round(statistics.fmean(r["per_second"] for r in done), 1)}
        for mode, done in runs.items()}
    off = result["modes"]["off"]["mean_cpu_ms_per_task"]
    result["overhead_cpu_ms_per_task"] = {
        mode: round(result["modes"][mode]["mean_cpu_ms_per_task"] - off, 2)
        for mode in ("default", "all")}
    save("tracing", result)


if __name__ == "__main__":
    main()
