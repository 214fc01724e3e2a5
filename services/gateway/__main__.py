"""Runs the gateway: ``python -m services.gateway``."""

import functools
import logging
import uuid
from datetime import timedelta

import grpc
from weir.internal.notifier.v1 import notifier_pb2_grpc
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import common_pb2

from libs import service, tls
from libs.cache import TtlCache
from libs.cassandra.attempt_logs import AttemptLogStore
from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.dedup import DedupStore
from libs.cassandra.functions import FunctionChangeFeed, FunctionStore
from libs.cassandra.listing import TaskListing
from libs.cassandra.operations import OperationStore
from libs.cassandra.parked import ParkedStore
from libs.cassandra.session import close, connect
from libs.cassandra.submissions import SubmissionStore
from libs.cassandra.taskstate import TaskStateStore
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.errors import NotFound, Unavailable
from libs.kafka.client import Producer
from libs.metrics import TenantLabels
from libs.periodic import Periodic
from services.gateway.admission import BACKLOG_POLL_SECONDS, Admission, BacklogPoller
from services.gateway.control import TaskControl
from services.gateway.engine import BUSY_PARTITION, FUNCTION_CACHE_SECONDS, Submitter
from services.gateway.metrics import GatewayMetrics
from services.gateway.operations import OperationRunner, OperationStarter
from services.gateway.server import create_server
from services.gateway.sweeper import SubmissionSweeper

OPERATION_POLL_SECONDS = 0.5
log = logging.getLogger(__name__)


def start(config: WeirConfig) -> service.Started:
    credentials = tls.Credentials.of(config, "gateway")
    session = connect(config)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="gateway")
    router = router_pb2_grpc.RouterServiceStub(
        credentials.channel(config.router_address, "router"))

    @functools.cache
    def notifier() -> notifier_pb2_grpc.NotifierServiceStub:
        # asyncio channel: made on first use, on the server's event loop that uses it.
        return notifier_pb2_grpc.NotifierServiceStub(
            credentials.aio_channel(config.notifier_address, "notifier"))
    tasks, listing, submissions = (TaskStateStore(session), TaskListing(session),
                                   SubmissionStore(session))
    functions, dedup = FunctionStore(session), DedupStore(session)
    dead_letters, operations = DeadLetterStore(session), OperationStore(session)

    def route(tenant_id: str, function: str, priority: common_pb2.Priority) -> router_pb2.Route:
        try:
            # wait_for_ready: a router restarting is waited for (within the timeout), not
            # failed at once because the channel is still backing off.
            return router.GetRoute(router_pb2.GetRouteRequest(
                tenant_id=tenant_id, function=function, priority=priority), timeout=5,
                wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(exc.details() or "no such tenant", reason="TENANT_NOT_FOUND") \
                    from exc
            raise Unavailable("the router cannot be reached to route the tasks; retry",
                              reason="ROUTER_UNAVAILABLE") from exc

    def adaptive_rate(tenant_id: str, function: str) -> common_pb2.AdaptiveRateState | None:
        try:
            return router.GetAdaptiveRate(router_pb2.GetAdaptiveRateRequest(
                tenant_id=tenant_id, function=function), timeout=1)
        except grpc.RpcError as exc:  # none held (NOT_FOUND), or the router is away
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("cannot read an adaptive rate", extra={"code": exc.code().name})
            return None

    admission = Admission(backlog_threshold=config.admission_backlog,
                          tenant_threshold=config.admission_tenant_backlog)
    function_cache = TtlCache(functions.get, ttl=FUNCTION_CACHE_SECONDS)
    function_changes = FunctionChangeFeed(functions, on_change=function_cache.forget,
                                          on_lost=function_cache.clear).start()
    submitter = Submitter(tasks=tasks, listing=listing, submissions=submissions,
                          functions=function_cache, dedup=dedup, route=route, producer=producer,
                          crash_after_store=config.fault == "gateway.crash_after_store",
                          metrics=GatewayMetrics(
                              labels=TenantLabels(config.metrics_max_tenant_labels)))
    backlog_poll = Periodic("backlog", BACKLOG_POLL_SECONDS, BacklogPoller(
        router=router, admission=admission, on_routes=submitter.routing_changed,
        busy_partition=BUSY_PARTITION).poll).start()
    control = TaskControl(tasks=tasks, listing=listing, dead_letters=dead_letters,
                          parked=ParkedStore(session), functions=functions, dedup=dedup,
                          producer=producer, attempt_logs=AttemptLogStore(session))
    server = create_server(config, tenants=TenantStore(session), submitter=submitter,
                           control=control, functions=functions,
                           function_changed=function_cache.forget,
                           dead_letters=dead_letters, notifier=notifier,
                           operations=OperationStarter(operations=operations, dedup=dedup),
                           adaptive_rate=adaptive_rate, admission=admission)
    runner = OperationRunner(
        operations=operations, control=control, dead_letters=dead_letters,
        owner=f"gateway-{config.advertise_host}:{server.port}-{uuid.uuid4().hex[:8]}",
        silent_after=timedelta(seconds=config.operation_silent_seconds))
    sweeper = Periodic("submission-sweeper", config.sweep_interval_seconds, SubmissionSweeper(
        submissions=submissions, tasks=tasks, producer=producer,
        grace=timedelta(seconds=config.unqueued_grace_seconds)).sweep).start()
    operation_polls = Periodic("operation-runner", OPERATION_POLL_SECONDS, runner.poll).start()

    def drain() -> None:
        function_changes.stop()
        backlog_poll.stop()
        operation_polls.stop()
        runner.stop()
        sweeper.stop()

    def shutdown() -> None:
        producer.close()
        close(session)

    return service.Started(server=server, drain=drain, close=shutdown)


if __name__ == "__main__":
    service.run("gateway", start)
