"""The Node.js client (clients/node) runs the README tour's steps against the running gateway:
its own `node --test` suite, given the gateway, a tenant's key and an echo function."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from tests.suite import ROOT

CLIENT = ROOT / "clients/node"


def test_the_node_client_runs_the_tour(suite, tenant):
    node = shutil.which("node")
    assert node, "node (20 or later) is required to test the Node.js client"
    assert (CLIENT / "node_modules/@grpc/grpc-js").is_dir(), \
        "the Node.js client's packages are missing: run `make node-client`"
    _, api_key = tenant
    with suite.client(api_key) as client:
        client.create_function("node-echo", "examples.demo:echo")  # its result is its payload
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", "test/tour.test.js"], cwd=CLIENT,
        env={**os.environ, "WEIR_ADDRESS": suite.address("gateway"), "WEIR_API_KEY": api_key,
             "WEIR_FUNCTION": "node-echo", "NO_COLOR": "1"},
        capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^ℹ pass [1-9]", output, re.M) and re.search(r"^ℹ fail 0$", output, re.M), \
        output
