"""The Go client (clients/go): its committed code is what the protos generate, and its test
runs the README tour against the running suite."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.suite import ROOT

CLIENT = ROOT / "clients/go"
TOOLS = ROOT / ".tools/bin"
GENERATED = "clients/go/weir/v1"


def test_the_committed_go_code_is_what_the_protos_generate(tmp_path):
    missing = [tool for tool in ("buf", "protoc-gen-go", "protoc-gen-go-grpc")
               if not (TOOLS / tool).exists()]
    assert not missing, f"{', '.join(missing)} missing from .tools/bin: run `make tools`"
    result = subprocess.run([TOOLS / "buf", "generate", "--template", "clients/go/buf.gen.yaml",
                             "-o", tmp_path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fresh, committed = files(tmp_path / GENERATED), files(ROOT / GENERATED)
    stale = sorted(name for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))
    assert not stale, f"{GENERATED} differs from the protos in {stale}: run `make go-client`"


def files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in root.rglob("*") if path.is_file()}


def test_the_go_client_runs_the_tour_against_the_suite(suite, tenant):
    go = shutil.which("go")
    assert go, "the go toolchain is not on PATH (Go 1.26: https://go.dev/dl/)"
    function = "go-echo"  # the tenant is the test's own
    with suite.client(tenant[1]) as client:
        client.create_function(function, "examples.demo:echo")
    # -count=1: a live test's result is never taken from go's test cache. -mod=readonly: the
    # committed go.mod and go.sum are used as they are (a cold module cache downloads them).
    result = subprocess.run(
        [go, "test", "-count=1", "-v", "./..."], cwd=CLIENT, capture_output=True, text=True,
        env={**os.environ, "GOFLAGS": "-mod=readonly", "WEIR_ADDRESS": suite.address("gateway"),
             "WEIR_API_KEY": tenant[1], "WEIR_FUNCTION": function},
        timeout=600)  # a cold module cache downloads grpc and protobuf first
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--- PASS: TestTour" in result.stdout, result.stdout
