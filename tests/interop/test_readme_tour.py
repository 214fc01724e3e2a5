"""The README's tour, run verbatim against the running suite: what users copy must work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.suite import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"<!-- tour -->\n```(bash|python)\n(.*?)```", README, re.S)


def test_the_readme_has_a_grpcurl_and_an_sdk_tour():
    assert [kind for kind, _ in BLOCKS] == ["bash", "bash", "python", "bash", "bash"]


@pytest.fixture
def checkout_like(tmp_path, tenant):
    """A folder laid out like a checkout after `make run`: the tenant's key, the tools, the
    venv (with `weir`)."""
    (tmp_path / ".weir").mkdir()
    (tmp_path / ".weir/demo-api-key").write_text(tenant[1] + "\n")
    (tmp_path / ".tools").symlink_to(ROOT / ".tools")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    return tmp_path


DEFAULT_METRICS_PORTS = {"gateway": 9464, "router": 9465, "dispatcher": 9466,
                         "executor_manager": 9467, "notifier": 9468}


@pytest.mark.parametrize("kind, code", BLOCKS,
                         ids=["grpcurl", "flow-control", "sdk", "cli", "where-the-time-went"])
def test_the_tour_block_runs_as_written(suite, checkout_like, kind, code):
    code = code.replace("127.0.0.1:50051", suite.address("gateway"))
    for name, port in DEFAULT_METRICS_PORTS.items():  # the suite's services have their own
        code = code.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{suite.metrics_ports[name]}/")
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" \
        else [sys.executable, "-c", code]
    # As wide as a terminal: off one, rich wraps weir's tables at 80 columns.
    result = subprocess.run(command, cwd=checkout_like, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    if "paced" in code:
        counts_line, tenant = result.stdout.split("\n", 1)
        per_second = json.loads(counts_line)
        assert sum(per_second) == 20 and max(per_second) <= 6 and len(per_second) >= 4, \
            per_second
        assert '"tenant_id"' in tenant
    elif "weir tasks" in code:
        assert "exit code 15" in result.stdout and "NOT_FOUND" in result.stderr
        assert "slept 200 ms" in result.stdout and "hello" in result.stdout
        assert result.stdout.count("SUCCEEDED") >= 20, result.stdout
    elif "traceparent" in code:
        spans = [line.split() for line in result.stdout.splitlines()
                 if re.match(r"^ +[0-9.]+ ms +[0-9.]+ ms ", line)]
        assert {span[4] for span in spans} >= {
            "weir-gateway", "weir-dispatcher", "weir-executor-manager", "weir-worker",
            "weir-notifier"}, result.stdout
        [handler] = [span for span in spans if span[5] == "weir.handler"]
        assert float(handler[2]) >= 200  # the sleep, where it happened
        assert "sleeping 200 ms" in result.stdout and "slept 200 ms" in result.stdout
        assert re.search(r'^weir_tasks_succeeded_total\{function="sleep",tenant="[^"]+"\} 1\.0$',
                         result.stdout, re.M), result.stdout
    elif kind == "bash":
        assert "weir.v1.TaskService" in result.stdout
        assert "TASK_STATE_SUCCEEDED" in result.stdout and '"aGVsbG8="' in result.stdout
        assert "Unauthenticated" in result.stderr
    else:
        lines = result.stdout.splitlines()
        assert lines[0] == "b'hello from the SDK'"
        assert "boom" in lines and "b'boom'" in lines
        assert lines[-3] == "TASK_STATE_SCHEDULED" and lines[-1] == "TASK_STATE_CANCELLED"
