"""The five services as real processes: health, reflection, auth, config, graceful stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import tasks_pb2, tasks_pb2_grpc

from libs.healthcheck import wait_until_serving
from tests.helpers import free_port
from tests.suite import ROOT, SERVICES

EXPECTED_SERVICES = {
    "gateway": {"weir.v1.TaskService", "weir.v1.FunctionService", "weir.v1.DeadLetterService",
                "weir.v1.OperationService"},
    "router": {"weir.internal.router.v1.RouterService"},
    "dispatcher": {"weir.internal.dispatcher.v1.DispatcherService"},
    "executor_manager": {"weir.internal.executor_manager.v1.ExecutorService"},
    "notifier": {"weir.internal.notifier.v1.NotifierService"},
}


def channel_to(suite, name: str) -> grpc.Channel:
    """Plaintext to the public gateway; mutual TLS as the operator to an internal service."""
    return (grpc.insecure_channel(suite.address(name)) if name == "gateway"
            else suite.internal_channel(name))


def listed_services(suite, name: str) -> set[str]:
    with channel_to(suite, name) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        return {s.name for reply in replies for s in reply.list_services_response.service}


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_reports_serving_for_itself_and_each_of_its_services(suite, name):
    with channel_to(suite, name) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *EXPECTED_SERVICES[name]]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_lists_its_services_through_reflection(suite, name):
    listed = listed_services(suite, name)
    assert EXPECTED_SERVICES[name] <= listed
    assert "grpc.health.v1.Health" in listed


def test_a_call_without_an_api_key_is_unauthenticated_with_a_reason(suite):
    with grpc.insecure_channel(suite.address("gateway")) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetTask(tasks_pb2.GetTaskRequest(task_id="t1"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(raised.value).details[0].Unpack(info)
    assert info.reason == "API_KEY_MISSING"


@pytest.mark.parametrize("key", ["weir_not-a-key", ""])
def test_a_wrong_api_key_is_unauthenticated(suite, key):
    with grpc.insecure_channel(suite.address("gateway")) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetTask(tasks_pb2.GetTaskRequest(task_id="t1"), timeout=5,
                         metadata=[("authorization", f"Bearer {key}")])
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_internal_rpcs_validate_their_requests(suite):
    with (suite.internal_channel("router", identity="gateway") as channel,
          pytest.raises(grpc.RpcError) as raised):
        router_pb2_grpc.RouterServiceStub(channel).GetRoute(router_pb2.GetRouteRequest(),
                                                           timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(raised.value).details[0].Unpack(bad)
    assert {v.field for v in bad.field_violations} == {"tenant_id", "function"}


def test_an_invalid_setting_stops_the_service_at_start_naming_the_variable(suite_config):
    env = {"WEIR_ROUTER_PORT": "not-a-port", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "services.router"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "WEIR_ROUTER_PORT" in result.stderr


def test_a_service_without_its_credentials_stops_at_start_saying_how_to_make_them(
        suite_config, tmp_path):
    env = {"WEIR_CREDENTIALS_DIR": str(tmp_path / "none"), "PATH": "/usr/bin:/bin",
           "WEIR_ROUTER_PORT": str(free_port()), "WEIR_ROUTER_METRICS_PORT": "0",
           "WEIR_KEYSPACE": suite_config.keyspace}
    result = subprocess.run([sys.executable, "-m", "services.router"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "python -m libs.tls init" in result.stderr


def test_sigterm_stops_a_service_gracefully_and_promptly(suite):
    port = free_port()
    env = {"WEIR_ROUTER_PORT": str(port), "WEIR_ROUTER_METRICS_PORT": "0",
           "WEIR_SHUTDOWN_GRACE_SECONDS": "1",
           "WEIR_KEYSPACE": suite.config.keyspace, "PATH": "/usr/bin:/bin",
           "WEIR_CREDENTIALS_DIR": str(suite.credentials_dir)}
    process = subprocess.Popen([sys.executable, "-m", "services.router"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout_seconds=60,
                           credentials=suite.credentials("operator"), peer="router")
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - began < 10
        assert '"msg": "stopped"' in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
