"""Hot tenants moved off the shared partitions (and back), and new tasks kept off busy
partitions, on the running suite."""

from __future__ import annotations

from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import common_pb2

from libs.cassandra.taskstate import TaskKey, TaskStateStore
from services.router.engine import shuffle_shard
from tests.e2e.test_flow_control import finished
from tests.helpers import eventually

HIGH = common_pb2.Priority.PRIORITY_HIGH


def routes_of(suite, tenant_id: str) -> dict[str, router_pb2.Route]:
    with suite.internal_channel("router", identity="gateway") as channel:
        response = router_pb2_grpc.RouterServiceStub(channel).ListRoutes(
            router_pb2.ListRoutesRequest(tenant_id=tenant_id), timeout=10)
    return {route.function: route for route in response.routes}


def partitions_of(store: TaskStateStore, tenant_id: str, ids: list[str]) -> set[int]:
    return {s.spec.partition for s in store.get_many(TaskKey(tenant_id, i) for i in ids)}


def test_a_hot_tenant_moves_to_partitions_of_its_own_and_back_once_drained(
        suite, cassandra, tenant):
    """A backlog past the threshold for the hold time moves every route of the tenant onto
    partitions beyond the shared ones (recorded with its reason in ListRoutes); new tasks
    follow, queued ones finish where they are, and once drained the routes go back home."""
    tenant_id, api_key = tenant
    store = TaskStateStore(cassandra)
    pool = set(range(suite.config.task_partitions,
                     suite.config.task_partitions + suite.config.isolated_partitions))
    try:
        suite.terminate("router")
        suite.restart("router", WEIR_HOT_TENANT_BACKLOG="40", WEIR_HOT_TENANT_DRAINED="5",
                      WEIR_HOT_TENANT_SECONDS="1")
        with suite.client(api_key) as client:
            client.create_function("held", "examples.demo:sleep", worker_concurrency=8,
                                   rate_limits={"max_concurrent_dispatches": 1})
            queued = [r.task.task_id for r in client.create_tasks(
                {"function": "held", "payload": b"30"} for _ in range(150))]
            home = list(shuffle_shard(tenant_id, "held", partitions=suite.config.task_partitions,
                                      shard_size=suite.config.shard_size))

            def moved() -> router_pb2.Route:
                route = routes_of(suite, tenant_id)["held"]
                assert list(route.home_partitions) == home, route
                return route
            route = eventually(moved, timeout=60, message="the hot tenant is moved")
            assert set(route.partitions) <= pool and route.version == 2
            assert "own" in route.move_reason and route.HasField("move_time")

            # New submissions follow the move (once the gateway sees the new generation),
            # for its other functions too; queued tasks stay where they are.
            def follows() -> list[str]:
                ids = [r.task.task_id for r in client.create_tasks(
                    {"function": name, "payload": b"1"} for name in ("held", "echo") * 5)]
                assert partitions_of(store, tenant_id, ids) <= pool
                return ids
            later = eventually(follows, timeout=30, message="new tasks go to its own partitions")
            assert partitions_of(store, tenant_id, queued) <= set(home)

            # A restarted router knows whom it moved: the routes stay (same version).
            suite.terminate("router")
            suite.restart("router", WEIR_HOT_TENANT_BACKLOG="40", WEIR_HOT_TENANT_DRAINED="5",
                          WEIR_HOT_TENANT_SECONDS="1")
            assert routes_of(suite, tenant_id)["held"] == route

            finished(store, tenant_id, queued + later, timeout=120)

            def back() -> router_pb2.Route:
                route = routes_of(suite, tenant_id)["held"]
                assert list(route.partitions) == home and not route.home_partitions, route
                return route
            route = eventually(back, timeout=60, message="the drained tenant moves back")
            assert "back" in route.move_reason and route.version == 3
    finally:
        suite.terminate("router")
        suite.restart("router")


def test_new_tasks_go_to_the_calm_partition_of_their_shard_while_the_other_is_busy(
        suite, cassandra, tenant_factory):
    """Tenant X floods one HIGH function; tenant Y's HIGH function shares one of its two
    partitions: while that one is busy, Y's new tasks all go to Y's other partition."""
    x_id, x_key = tenant_factory()
    y_id, y_key = tenant_factory()
    partitions, k = suite.config.task_partitions, suite.config.shard_size
    x_shard = set(shuffle_shard(x_id, "flood", partitions=partitions, shard_size=k))
    y_name = next(f"calm{n}" for n in range(1000) if len(
        x_shard & set(shuffle_shard(y_id, f"calm{n}", partitions=partitions, shard_size=k))) == 1)
    [calm] = set(shuffle_shard(y_id, y_name, partitions=partitions, shard_size=k)) - x_shard
    store = TaskStateStore(cassandra)
    with suite.client(x_key) as x, suite.client(y_key) as y:
        x.create_function("flood", "examples.demo:sleep", worker_concurrency=8,
                          rate_limits={"max_concurrent_dispatches": 1})
        y.create_function(y_name, "examples.demo:echo")
        flood = [r.task.task_id for r in x.create_tasks(
            {"function": "flood", "payload": b"20", "priority": HIGH} for _ in range(600))]

        def steered() -> list[str]:
            ids = [r.task.task_id for r in y.create_tasks(
                {"function": y_name, "payload": b"1", "priority": HIGH} for _ in range(20))]
            assert partitions_of(store, y_id, ids) == {calm}
            return ids
        first = eventually(steered, timeout=30, message="Y's tasks avoid the busy partition")
        ids = [r.task.task_id for r in y.create_tasks(
            {"function": y_name, "payload": b"1", "priority": HIGH} for _ in range(40))]
        assert partitions_of(store, y_id, ids) == {calm}
    finished(store, y_id, first + ids, timeout=60)
    finished(store, x_id, flood, timeout=180)
