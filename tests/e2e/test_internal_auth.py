"""Internal services admit only Weir services, each only for what it may call (mutual TLS).

What an attacker on the network tried before: announce a fake executor to the dispatcher and
receive other tenants' tasks, replay a dispatch with a forged payload, cancel a running
attempt, stream any tenant's timeline, list routes — all without credentials. (Executors now
take their work from the dispatchers' Work streams; there is no dispatch or cancel call to
an executor left to forge.)
"""

from __future__ import annotations

import grpc
import pytest
from weir.internal.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from weir.internal.executor_manager.v1 import executor_manager_pb2, executor_manager_pb2_grpc
from weir.internal.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import common_pb2, tasks_pb2

from libs import tls
from tests.helpers import eventually

State = tasks_pb2.TaskState
INTERNAL = ("router", "dispatcher", "executor_manager", "notifier")


def probes(channel: grpc.Channel) -> dict[str, callable]:
    """One harmless call per internal service."""
    return {
        "router": lambda: router_pb2_grpc.RouterServiceStub(channel).ListRoutes(
            router_pb2.ListRoutesRequest(tenant_id="t"), timeout=5),
        "dispatcher": lambda: next(dispatcher_pb2_grpc.DispatcherServiceStub(channel).Work(
            iter([dispatcher_pb2.WorkRequest(executor_id="fake", credits=100)]), timeout=5)),
        "executor_manager": lambda: executor_manager_pb2_grpc.ExecutorServiceStub(
            channel).GetLoad(executor_manager_pb2.GetLoadRequest(), timeout=5),
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


def test_garbage_on_a_work_stream_costs_nothing_and_tasks_still_run(suite, tenant):
    """Before: a dispatch with lease_id "not-a-uuid" answered INTERNAL and kept a worker;
    four of them stopped all execution."""
    with suite.internal_channel("dispatcher", identity="executor-manager") as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        assert refused(lambda: next(stub.Work(iter([dispatcher_pb2.WorkRequest()]),
                                              timeout=5))) == grpc.StatusCode.INVALID_ARGUMENT
        junk = dispatcher_pb2.WorkRequest(
            executor_id="junk", credits=-5, renew=["not-an-attempt", "x/1/2/3"],
            reports=[dispatcher_pb2.AttemptReport(attempt_id="weir.tasks.normal/0/1/1",
                                                  topic="weir.tasks.normal", partition=0)])
        replies = stub.Work(iter([junk]), timeout=5)
        answers = [next(replies) for _ in range(2)]
        replies.cancel()
        flagged = {a for r in answers for a in [*r.moved, *r.stale]}
        assert {"not-an-attempt", "x/1/2/3", "weir.tasks.normal/0/1/1"} <= flagged
        assert not any(r.assignments for r in answers)  # no credits, no work
    _, api_key = tenant
    with suite.client(api_key) as client:
        task = client.create_task("echo", b"still running")
        assert client.wait(task.task_id, timeout=60).state == State.TASK_STATE_SUCCEEDED


def test_a_process_without_the_executor_certificate_takes_no_task(suite, tenant):
    """A process holding some other Weir certificate (here the router's) asks for work."""
    with suite.internal_channel("dispatcher", identity="router") as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        assert refused(lambda: next(stub.Work(iter([dispatcher_pb2.WorkRequest(
            executor_id="fake", credits=100)]), timeout=5))) == \
            grpc.StatusCode.PERMISSION_DENIED
    _, api_key = tenant
    with suite.client(api_key) as client:
        created = client.create_tasks([{"function": "echo", "payload": b"secret"}] * 5)
        for result in created:
            done = client.wait(result.task.task_id, timeout=60)
            assert done.state == State.TASK_STATE_SUCCEEDED
            assert done.attempts[-1].executor_id == suite.address("executor_manager")


def test_the_operator_may_call_internal_services_deliberately(suite):
    with suite.internal_channel("router") as channel:
        reply = router_pb2_grpc.RouterServiceStub(channel).ListRoutes(
            router_pb2.ListRoutesRequest(tenant_id="nobody"), timeout=5)
    assert list(reply.routes) == []


def test_only_dispatchers_may_share_limits_and_bad_demands_are_refused(suite):
    demand = router_pb2.LimitDemand(tenant_id="t", function="f", waiting=10,
                                    limits=common_pb2.RateLimits(max_dispatches_per_second=5))
    with suite.internal_channel("router", identity="gateway") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        assert refused(lambda: stub.ShareLimits(router_pb2.ShareLimitsRequest(
            dispatcher_id="probe", demands=[demand]), timeout=5)) == \
            grpc.StatusCode.PERMISSION_DENIED
    with suite.internal_channel("router", identity="dispatcher") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        bad = router_pb2.LimitDemand(tenant_id="t", function="f" * 200, out=-1,
                                     held_rate=float("nan"))
        with pytest.raises(grpc.RpcError) as raised:
            stub.ShareLimits(router_pb2.ShareLimitsRequest(demands=[bad]), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for field in ("dispatcher_id", "demands[0].function", "demands[0].out",
                      "demands[0].held_rate"):
            assert field in raised.value.details()

        def granted() -> router_pb2.ShareLimitsResponse:
            reply = stub.ShareLimits(router_pb2.ShareLimitsRequest(
                dispatcher_id="probe", demands=[demand]), timeout=5)
            assert reply.shares[0].rate > 0  # none while a fresh router is still learning
            return reply
        reply = eventually(granted, timeout=10)
    assert reply.shares[0].rate <= 5 and reply.lease.seconds == 2
