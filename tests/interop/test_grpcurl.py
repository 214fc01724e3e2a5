"""grpcurl, the operators' tool, against the running gateway (reflection, JSON, metadata)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.suite import ROOT

GRPCURL = ROOT / ".tools/bin/grpcurl"


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    assert GRPCURL.exists(), "grpcurl is missing: run `make tools`"
    return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True,
                          timeout=30)


def test_grpcurl_lists_the_weir_v1_services_through_reflection(suite):
    result = grpcurl(suite.address("gateway"), "list")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    assert {"weir.v1.TaskService", "weir.v1.FunctionService", "weir.v1.DeadLetterService",
            "weir.v1.OperationService", "grpc.health.v1.Health"} <= listed


def test_grpcurl_describes_the_fixed_create_task_contract(suite):
    result = grpcurl(suite.address("gateway"), "describe", "weir.v1.Task")
    assert result.returncode == 0, result.stderr
    for fragment in ("string task_id", "string function", "bytes payload",
                     ".weir.v1.TaskState state", "bytes result"):
        assert fragment in result.stdout


def test_grpcurl_health_check_needs_no_api_key(suite):
    result = grpcurl(suite.address("gateway"), "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


@pytest.mark.parametrize("with_key, expected", [(False, "Unauthenticated"),
                                                 (True, "Unimplemented")])
def test_grpcurl_create_task_as_an_operator_script_would(suite, demo_api_key, with_key,
                                                          expected):
    body = json.dumps({"task": {"function": "echo", "payload": "aGk="}})
    headers = ["-H", f"authorization: Bearer {demo_api_key}"] if with_key else []
    result = grpcurl(*headers, "-d", body, suite.address("gateway"),
                     "weir.v1.TaskService/CreateTask")
    assert result.returncode != 0
    assert f"Code: {expected}" in result.stderr
