"""Crashes (kill -9) of the executor-manager, the dispatcher, and the gateway between store and
produce: every acknowledged task still completes. Each test prints how long recovery took."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from weir.v1 import tasks_pb2

from libs import errors
from libs.cassandra.taskstate import TaskKey, TaskStateStore
from libs.healthcheck import wait_until_serving
from libs.sdk import Client
from tests.helpers import eventually, free_port
from tests.suite import ROOT

State = tasks_pb2.TaskState


def all_succeeded(store: TaskStateStore, tenant_id: str, ids: list[str]):
    def check():
        stored = store.get_many(TaskKey(tenant_id, i) for i in ids)
        states = [s.state for s in stored]
        assert all(s == State.TASK_STATE_SUCCEEDED for s in states), states
        return stored
    return check


def test_killing_the_executor_manager_mid_task_loses_nothing(suite, cassandra, tenant):
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    with suite.client(api_key) as client:
        ids = [client.create_task("sleep", b"2000").task_id for _ in range(6)]

        def some_running():
            return sum(s.state == State.TASK_STATE_RUNNING
                       for s in store.get_many(TaskKey(tenant_id, i) for i in ids)) >= 2

        eventually(some_running, timeout=60, message="sleep tasks running")
        killed = time.monotonic()
        suite.kill("executor_manager")
        suite.restart("executor_manager")
        stored = eventually(all_succeeded(store, tenant_id, ids), timeout=120, interval=0.5,
                            message="every task done after the crash")
        print(f"\nexecutor-manager kill -9: all tasks done {time.monotonic() - killed:.1f}s "
              "after the kill")
    lost = [a for s in stored for a in s.attempts()
            if a.exit_reason == tasks_pb2.ExitReason.EXIT_REASON_LEASE_LOST]
    assert lost, "the killed attempts are kept in the history"
    for s in stored:
        assert sum(a.exit_reason == tasks_pb2.ExitReason.EXIT_REASON_RETURNED
                   for a in s.attempts()) == 1


def test_killing_the_dispatcher_loses_nothing(suite, cassandra, tenant):
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    with suite.client(api_key) as client:
        ids = [r.task.task_id for r in client.create_tasks(
            [{"function": "sleep", "payload": b"200"} for _ in range(30)])]
        killed = time.monotonic()
        suite.kill("dispatcher")
        more = [client.create_task("echo", b"after").task_id for _ in range(5)]
        suite.restart("dispatcher")
        eventually(all_succeeded(store, tenant_id, ids + more), timeout=120, interval=0.5,
                   message="every task done after the crash")
        print(f"\ndispatcher kill -9: all tasks done {time.monotonic() - killed:.1f}s after "
              "the kill")


def test_a_gateway_dying_between_store_and_produce_loses_no_stored_task(suite, cassandra,
                                                                        tenant):
    tenant_id, api_key = tenant
    port = free_port()
    faulty = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=suite.env(WEIR_GATEWAY_PORT=str(port), WEIR_GATEWAY_METRICS_PORT="0",
                      WEIR_FAULT="gateway.crash_after_store"))
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout_seconds=60)
        with Client(f"127.0.0.1:{port}", api_key=api_key, timeout=30) as client, \
                pytest.raises(errors.WeirError) as raised:
            client.create_task("echo", b"survivor", task_id="crash-between-store-and-produce")
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        crashed = time.monotonic()
        assert faulty.wait(timeout=30) == 17
    finally:
        if faulty.poll() is None:
            faulty.kill()
    store = TaskStateStore(cassandra)
    eventually(all_succeeded(store, tenant_id, ["crash-between-store-and-produce"]),
               timeout=60, interval=0.5, message="the stored task ran")
    print(f"\ngateway crash after store: the task done {time.monotonic() - crashed:.1f}s "
          "after the crash (queued by the sweeper)")
    with suite.client(api_key) as client:
        task = client.get_task("crash-between-store-and-produce")
    assert task.result == b"survivor"
    assert [s.service for s in task.stages][:2] == ["gateway", "gateway"]
