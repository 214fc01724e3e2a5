"""Flow control on the running suite: priority tiers with a starvation bound."""

from __future__ import annotations

from weir.v1 import common_pb2, tasks_pb2

from libs.cassandra.taskstate import TaskKey, TaskStateStore
from tests.helpers import eventually

State = tasks_pb2.TaskState
HIGH, LOW = common_pb2.Priority.PRIORITY_HIGH, common_pb2.Priority.PRIORITY_LOW


def finished(store: TaskStateStore, tenant_id: str, ids: list[str], *, timeout: float):
    """Every task once it SUCCEEDED (waits for all of them)."""
    def done():
        stored = []
        for start in range(0, len(ids), 200):
            stored += store.get_many(TaskKey(tenant_id, i) for i in ids[start:start + 200])
        unfinished = [s for s in stored if s is None or s.state != State.TASK_STATE_SUCCEEDED]
        assert not unfinished, f"{len(unfinished)} of {len(ids)} not succeeded yet"
        return stored
    return eventually(done, timeout=timeout, interval=0.5, message="every task succeeded")


def test_high_goes_ahead_of_low_while_low_keeps_its_minimum_share(suite, cassandra, tenant):
    """LOW work already queued, then a flood of HIGH that saturates the executor: while HIGH
    waits, HIGH takes most dispatches, and LOW still gets its share (0.1 by default)."""
    tenant_id, api_key = tenant
    client = suite.client(api_key)
    # One batch, so both tiers reach the dispatcher together.
    tiers = [LOW if n % 5 == 0 else HIGH for n in range(600)]
    results = client.create_tasks({"function": "sleep", "payload": b"200", "priority": tier}
                                  for tier in tiers)
    low = {r.task.task_id for r, tier in zip(results, tiers, strict=True) if tier == LOW}
    high = [r.task.task_id for r, tier in zip(results, tiers, strict=True) if tier == HIGH]
    assert all(low) and all(high)

    store = TaskStateStore(cassandra)
    stored = finished(store, tenant_id, [*low, *high], timeout=120)
    dispatched = sorted((s.attempts()[0].dispatch_time.ToNanoseconds(), s.key.task_id in low)
                        for s in stored)
    high_times = [t for t, is_low in dispatched if not is_low]
    # While HIGH waits: from its first dispatch to its last.
    during = [is_low for t, is_low in dispatched if high_times[0] <= t <= high_times[-1]]
    low_share = sum(during) / len(during)
    assert 0.07 <= low_share <= 0.2, (
        f"LOW took {low_share:.1%} of {len(during)} dispatches while HIGH waited")
