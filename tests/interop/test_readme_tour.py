"""The README's tour, run verbatim against the running suite: what users copy must work."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.suite import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"<!-- tour -->\n```(bash|python)\n(.*?)```", README, re.S)


def test_the_readme_has_a_grpcurl_and_an_sdk_tour():
    assert [kind for kind, _ in BLOCKS] == ["bash", "bash", "python"]


@pytest.fixture
def checkout_like(tmp_path, tenant):
    """A folder laid out like a checkout after `make run`: the tenant's key, the tools."""
    (tmp_path / ".weir").mkdir()
    (tmp_path / ".weir/demo-api-key").write_text(tenant[1] + "\n")
    (tmp_path / ".tools").symlink_to(ROOT / ".tools")
    return tmp_path


@pytest.mark.parametrize("kind, code", BLOCKS, ids=["grpcurl", "flow-control", "sdk"])
def test_the_tour_block_runs_as_written(suite, checkout_like, kind, code):
    code = code.replace("127.0.0.1:50051", suite.address("gateway"))
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" \
        else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=checkout_like, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    if "paced" in code:
        counts_line, tenant = result.stdout.split("\n", 1)
        per_second = json.loads(counts_line)
        assert sum(per_second) == 20 and max(per_second) <= 6 and len(per_second) >= 4, \
            per_second
        assert '"tenant_id"' in tenant
    elif kind == "bash":
        assert "weir.v1.TaskService" in result.stdout
        assert "TASK_STATE_SUCCEEDED" in result.stdout and '"aGVsbG8="' in result.stdout
        assert "Unauthenticated" in result.stderr
    else:
        lines = result.stdout.splitlines()
        assert lines[0] == "b'hello from the SDK'"
        assert "boom" in lines and "b'boom'" in lines
        assert lines[-3] == "TASK_STATE_SCHEDULED" and lines[-1] == "TASK_STATE_CANCELLED"
