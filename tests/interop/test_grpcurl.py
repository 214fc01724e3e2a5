"""grpcurl, the operators' tool, against the running gateway (reflection, JSON, metadata)."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import eventually
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


def test_grpcurl_create_task_without_a_key_is_unauthenticated(suite):
    body = json.dumps({"task": {"function": "echo", "payload": "aGk="}})
    result = grpcurl("-d", body, suite.address("gateway"), "weir.v1.TaskService/CreateTask")
    assert result.returncode != 0
    assert "Code: Unauthenticated" in result.stderr


def test_grpcurl_runs_a_task_as_an_operator_script_would(suite, tenant):
    _, api_key = tenant
    auth = ["-H", f"authorization: Bearer {api_key}"]
    body = json.dumps({"task": {"function": "echo", "payload": "aGVsbG8="}})
    created = grpcurl(*auth, "-d", body, suite.address("gateway"),
                      "weir.v1.TaskService/CreateTask")
    assert created.returncode == 0, created.stderr
    task = json.loads(created.stdout)
    assert task["state"] == "TASK_STATE_QUEUED" and task["function"] == "echo"

    def succeeded():
        got = grpcurl(*auth, "-d", json.dumps({"task_id": task["task_id"]}),
                      suite.address("gateway"), "weir.v1.TaskService/GetTask")
        assert got.returncode == 0, got.stderr
        reply = json.loads(got.stdout)
        return reply if reply["state"] == "TASK_STATE_SUCCEEDED" else None

    done = eventually(succeeded, timeout=60, message="the task succeeded")
    assert done["result"] == "aGVsbG8="


def test_reflection_v1_and_v1alpha_both_list_the_services(suite):
    # grpcurl asks v1 first, so it describes and calls v1 itself through v1's own schema.
    described = grpcurl(suite.address("gateway"), "describe",
                        "grpc.reflection.v1.ServerReflection")
    assert described.returncode == 0, described.stderr
    assert "ServerReflectionInfo" in described.stdout
    for version in ("v1", "v1alpha"):
        result = grpcurl("-d", '{"list_services": ""}', suite.address("gateway"),
                         f"grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")
        assert result.returncode == 0, result.stderr
        names = {s["name"] for s in json.loads(result.stdout)["list_services_response"]["service"]}
        assert {"weir.v1.TaskService", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
