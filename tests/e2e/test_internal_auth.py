"""Internal services admit only Weir services, each only for what it may call (mutual TLS).

What an attacker on the network tried before: announce a fake executor to the dispatcher and
receive other tenants' tasks, replay a dispatch with a forged payload, cancel a running
attempt, stream any tenant's timeline, list routes — all without credentials.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from weir.internal.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs import tls

State = tasks_pb2.TaskState
INTERNAL = ("router", "dispatcher", "executor_manager", "notifier")


def probes(channel: grpc.Channel) -> dict[str, callable]:
    """One harmless call per internal service."""
    return {
        "router": lambda: router_pb2_grpc.RouterServiceStub(channel).ListRoutes(
            router_pb2.ListRoutesRequest(tenant_id="t"), timeout=5),
        "dispatcher": lambda: dispatcher_pb2_grpc.DispatcherServiceStub(channel).ReportLoad(
            dispatcher_pb2.ReportLoadRequest(executor_id="fake", address="127.0.0.1:1",
                                             capacity=100), timeout=5),
        "executor_manager": lambda: executor_manager_pb2_grpc.ExecutorServiceStub(
            channel).CancelAttempt(executor_manager_pb2.CancelAttemptRequest(
                tenant_id="t", task_id="x"), timeout=5),
        "notifier": lambda: next(notifier_pb2_grpc.NotifierServiceStub(channel).WatchTask(
            notifier_pb2.WatchTaskRequest(tenant_id="t", task_id="x"), timeout=5)),
    }


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


@pytest.mark.parametrize("name", INTERNAL)
def test_an_internal_port_refuses_a_caller_without_a_certificate(suite, name):
    with grpc.insecure_channel(suite.address(name)) as plain:
        assert refused(probes(plain)[name]) == grpc.StatusCode.UNAVAILABLE
    # TLS that trusts the deployment CA but presents no client certificate.
    server_only = grpc.ssl_channel_credentials(root_certificates=_ca(suite))
    with grpc.secure_channel(suite.address(name), server_only, options=[
            ("grpc.ssl_target_name_override", tls.dns_name(name.replace("_", "-")))]) as tls_only:
        assert refused(probes(tls_only)[name]) == grpc.StatusCode.UNAVAILABLE


def _ca(suite) -> bytes:
    return (suite.credentials_dir / "ca.pem").read_bytes()


@pytest.mark.parametrize("name", INTERNAL)
def test_a_certificate_of_another_deployment_is_refused(suite, name, tmp_path):
    tls.init(tmp_path)
    foreign = tls.Credentials.load(tmp_path, "gateway")
    # It trusts our CA for the server, but its own certificate comes from another CA.
    mixed = tls.Credentials(identity="gateway", ca=_ca(suite),
                            certificate=foreign.certificate, key=foreign.key)
    with mixed.channel(suite.address(name), name.replace("_", "-")) as channel:
        assert refused(probes(channel)[name]) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name, identity", [
    ("router", "dispatcher"), ("dispatcher", "gateway"), ("executor_manager", "notifier"),
    ("notifier", "router")])
def test_a_weir_service_may_call_only_what_it_needs(suite, name, identity):
    with suite.internal_channel(name, identity=identity) as channel:
        assert refused(probes(channel)[name]) == grpc.StatusCode.PERMISSION_DENIED


def test_only_a_dispatcher_may_dispatch_and_a_bad_lease_costs_no_worker(suite, tenant):
    request = executor_manager_pb2.DispatchRequest(
        task=records_pb2.TaskMessage(tenant_id="t", task_id="x", function="echo"),
        lease_id="not-a-uuid")
    with suite.internal_channel("executor_manager", identity="gateway") as channel:
        stub = executor_manager_pb2_grpc.ExecutorServiceStub(channel)
        assert refused(lambda: stub.Dispatch(request, timeout=5)) == \
            grpc.StatusCode.PERMISSION_DENIED
    with suite.internal_channel("executor_manager", identity="dispatcher") as channel:
        stub = executor_manager_pb2_grpc.ExecutorServiceStub(channel)
        for _ in range(12):  # more than the executor's workers
            assert refused(lambda: stub.Dispatch(request, timeout=5)) == \
                grpc.StatusCode.INVALID_ARGUMENT
    _, api_key = tenant
    with suite.client(api_key) as client:
        task = client.create_task("echo", b"still running")
        assert client.wait(task.task_id, timeout=60).state == State.TASK_STATE_SUCCEEDED


class RecordingExecutor(executor_manager_pb2_grpc.ExecutorServiceServicer):
    def __init__(self) -> None:
        self.dispatched: list[executor_manager_pb2.DispatchRequest] = []
        self.lock = threading.Lock()

    def Dispatch(self, request, context):
        with self.lock:
            self.dispatched.append(request)
        return executor_manager_pb2.DispatchResponse(executor_id="fake")


def test_an_executor_without_the_executor_certificate_receives_no_task(suite, tenant):
    # A process holding some other Weir certificate (here the router's) serves the executor
    # protocol and is announced with more free slots than any real executor.
    fake = RecordingExecutor()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    executor_manager_pb2_grpc.add_ExecutorServiceServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", suite.credentials("router").server())
    server.start()
    stop_reporting = threading.Event()

    def report() -> None:
        with suite.internal_channel("dispatcher", identity="executor-manager") as channel:
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            while not stop_reporting.wait(0.2):
                stub.ReportLoad(dispatcher_pb2.ReportLoadRequest(
                    executor_id="fake", address=f"127.0.0.1:{port}", capacity=100),
                    timeout=5)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        _, api_key = tenant
        with suite.client(api_key) as client:
            created = client.create_tasks([{"function": "echo", "payload": b"secret"}] * 5)
            for result in created:
                done = client.wait(result.task.task_id, timeout=60)
                assert done.state == State.TASK_STATE_SUCCEEDED
                assert done.attempts[-1].executor_id != "fake"
        assert fake.dispatched == []
    finally:
        stop_reporting.set()
        reporter.join(5)
        server.stop(0)


def test_the_operator_may_call_internal_services_deliberately(suite):
    with suite.internal_channel("router") as channel:
        reply = router_pb2_grpc.RouterServiceStub(channel).ListRoutes(
            router_pb2.ListRoutesRequest(tenant_id="nobody"), timeout=5)
    assert list(reply.routes) == []
