"""The fenced single-writer task path under its hardest faults: a zombie partition owner, an
owner killed mid-flush, and Kafka and Cassandra themselves killed and restarted while tasks
flow — with no Weir service restarted by hand. Every task ends SUCCEEDED with exactly one
success recorded."""

from __future__ import annotations

import subprocess
import threading

import pytest
from weir.v1 import tasks_pb2

from libs.cassandra.taskstate import TaskKey, TaskStateStore
from libs.healthcheck import is_serving
from tests.helpers import eventually
from tests.suite import ROOT, identity_of

State = tasks_pb2.TaskState
Exit = tasks_pb2.ExitReason


def exactly_once(store: TaskStateStore, tenant_id: str, ids: list[str], *, timeout: float):
    """Waits until every task SUCCEEDED; then checks one success each, in attempts and stages."""
    def done():
        stored = []
        for start in range(0, len(ids), 200):
            stored += store.get_many(TaskKey(tenant_id, i) for i in ids[start:start + 200])
        missing = [i for i, s in zip(ids, stored, strict=True) if s is None]
        assert not missing, f"{len(missing)} created tasks are missing, e.g. {missing[:3]}"
        unfinished = [s for s in stored if s.state != State.TASK_STATE_SUCCEEDED]
        assert not unfinished, (
            f"{len(unfinished)} of {len(ids)} not succeeded, e.g. {unfinished[0].key.task_id}: "
            f"{State.Name(unfinished[0].state)}, attempts {unfinished[0].attempts()}, "
            f"stages {unfinished[0].stages()}")
        return stored

    stored = eventually(done, timeout=timeout, interval=1.0, message="every task succeeded")
    for task in stored:
        returned = [a for a in task.attempts() if a.exit_reason == Exit.EXIT_REASON_RETURNED]
        assert len(returned) == 1, (task.key, task.attempts())
        assert [s.state for s in task.stages()].count(State.TASK_STATE_SUCCEEDED) == 1
    return stored


class Flow:
    """Tasks submitted in the background at a steady pace until stopped."""

    def __init__(self, client, *, function: str = "sleep", payload: bytes = b"50",
                 per_second: float = 40) -> None:
        self.ids: list[str] = []
        self.errors: list[Exception] = []
        self._client = client
        self._function, self._payload = function, payload
        self._interval = 1 / per_second
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.ids.append(self._client.create_task(self._function, self._payload).task_id)
            except Exception as exc:  # an engine down: a client retries (or gives up)
                self.errors.append(exc)


def test_a_zombie_owner_writes_nothing_that_sticks(suite, cassandra, tenant):
    """A dispatcher frozen (SIGSTOP) past its session loses its partitions to the other; its
    in-flight work is adopted and finished there; thawed (SIGCONT), it learns it lost them
    before it writes, and every task still has exactly one success."""
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    suite.launch("dispatcher_2", module="dispatcher")
    suite.wait_serving("dispatcher_2")
    both = f"{suite.address('dispatcher')},{suite.address('dispatcher_2')}"
    suite.terminate("executor_manager")
    suite.restart("executor_manager", WEIR_DISPATCHER_ADDRESSES=both)
    frozen = False
    try:
        with suite.client(api_key) as client:
            warm = client.create_tasks([{"function": "sleep", "payload": b"100"}] * 40)
            exactly_once(store, tenant_id, [r.task.task_id for r in warm], timeout=90)
            with Flow(client) as flow:
                eventually(lambda: len(flow.ids) >= 60, timeout=30)
                suite.pause("dispatcher")
                frozen = True
                eventually(lambda: len(flow.ids) >= 400, timeout=120)
            # The survivor took every partition over and finished everything, also what the
            # frozen one had sent out.
            exactly_once(store, tenant_id, flow.ids, timeout=120)
            suite.resume("dispatcher")
            frozen = False
            # Thawed, it rejoins the group and takes partitions again under new epochs.
            zombie = f"-{suite.services['dispatcher'].process.pid}"
            eventually(lambda: any(row.owner.endswith(zombie) for row in cassandra.execute(
                "SELECT owner FROM partition_owners")), timeout=90, message="the zombie rejoined")
            # Whatever it had in hand when frozen changed nothing that stays.
            later = [client.create_task("echo", b"after").task_id for _ in range(30)]
            exactly_once(store, tenant_id, flow.ids + later, timeout=120)
    finally:
        if frozen:
            suite.resume("dispatcher")
        suite.terminate("dispatcher_2")
        suite.terminate("executor_manager")
        suite.restart("executor_manager")


def test_killing_the_owner_mid_flush_loses_nothing_and_runs_each_task_once(
        suite, cassandra, tenant):
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    with suite.client(api_key) as client, Flow(client, per_second=60) as flow:
        eventually(lambda: len(flow.ids) >= 150, timeout=30)
        suite.kill("dispatcher")  # it flushes every few milliseconds: mid-flush, likely
        suite.restart("dispatcher")
        eventually(lambda: len(flow.ids) >= 400, timeout=60)
    assert not flow.errors
    exactly_once(store, tenant_id, flow.ids, timeout=120)


def engine(action: str, name: str) -> None:
    subprocess.run([ROOT / "deploy/local/engines.sh", action, name], check=True,
                   capture_output=True, timeout=300)


def kill_engine(name: str) -> None:
    pid = int((ROOT / ".var" / "run" / f"{name}.pid").read_text().strip())
    subprocess.run(["kill", "-9", str(pid)], check=True)
    eventually(lambda: subprocess.run(["kill", "-0", str(pid)],
                                      capture_output=True).returncode != 0, timeout=30)


@pytest.mark.parametrize("name", ["kafka", "cassandra"])
def test_an_engine_killed_and_restarted_mid_run_loses_nothing_and_no_service_restarts(
        suite, cassandra, tenant, name):
    """kill -9 of Kafka (or Cassandra) while tasks flow, then its own start script: the
    services ride it out — consumers rejoin, producers and flushes retry — and every task
    accepted before, during and after runs exactly once."""
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    pids = {n: s.process.pid for n, s in suite.services.items()}
    with suite.client(api_key) as client:
        with Flow(client, per_second=30) as flow:
            eventually(lambda: len(flow.ids) >= 90, timeout=30)
            kill_engine(name)
            engine("start", name)
            eventually(lambda: len(flow.ids) >= 300, timeout=180)
        after = [client.create_task("echo", b"after").task_id for _ in range(20)]
    exactly_once(store, tenant_id, flow.ids + after, timeout=240)
    for service, process in suite.services.items():
        assert process.process.pid == pids[service] and process.process.poll() is None, service
        internal = process.module != "gateway"
        assert is_serving(process.address, timeout_seconds=5,
                          credentials=suite.credentials("operator") if internal else None,
                          peer=identity_of(process.module) if internal else "")
