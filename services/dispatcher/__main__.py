"""Runs the dispatcher: ``python -m services.dispatcher``."""

import os
from datetime import timedelta

from weir.internal.router.v1 import router_pb2_grpc
from weir.v1.common_pb2 import Priority

from libs import service, tls
from libs.cassandra.attempt_logs import AttemptLogStore
from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.functions import FunctionChangeFeed, FunctionStore
from libs.cassandra.owners import PartitionOwners
from libs.cassandra.parked import ParkedStore
from libs.cassandra.partition_index import PartitionIndex
from libs.cassandra.session import close, connect
from libs.cassandra.taskstate import TaskStateStore
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.kafka.client import Consumer, ConsumerLoop, Producer
from libs.kafka.topics import PRIORITY_TIERS, results_topic, task_topic, weir_topics
from libs.metrics import TenantLabels
from libs.periodic import Periodic
from services.dispatcher.engine import (
    PACE_EVERY_SECONDS,
    Adoption,
    Flusher,
    Functions,
    Intake,
    LimitSync,
    PartitionConsumer,
    Publisher,
    TenantLimits,
    TimerWheel,
    UnreadBacklog,
)
from services.dispatcher.metrics import DispatcherMetrics
from services.dispatcher.owner import Owner
from services.dispatcher.server import create_server


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="dispatcher")
    lease = timedelta(seconds=config.lease_seconds)
    tasks, index = TaskStateStore(session), PartitionIndex(session)
    owners = PartitionOwners(session)
    function_store = FunctionStore(session)
    functions = Functions(function_store)
    function_changes = FunctionChangeFeed(function_store, on_change=functions.changed,
                                          on_lost=functions.lost).start()
    tenants = TenantLimits(TenantStore(session))
    owner_name = f"dispatcher-{config.advertise_host}-{os.getpid()}"
    metrics = DispatcherMetrics(labels=TenantLabels(config.metrics_max_tenant_labels))
    owner = Owner(lease=lease, dispatcher_id=owner_name, functions=functions.now,
                  tenant_limits=tenants.now,
                  shares={Priority.PRIORITY_NORMAL: config.normal_min_share,
                          Priority.PRIORITY_LOW: config.low_min_share}, metrics=metrics)
    server = create_server(config, owner=owner)
    results = next(t for t in weir_topics(config) if t.name == results_topic(config.topic_prefix))
    timers = TimerWheel(owner=owner, index=index, tasks=tasks, owners=owners,
                        functions=functions).start()
    flusher = Flusher(owner=owner, tasks=tasks, index=index, owners=owners,
                      dead_letters=DeadLetterStore(session), parked=ParkedStore(session),
                      timers=timers, functions=functions,
                      attempt_logs=AttemptLogStore(session, retention=timedelta(
                          seconds=config.attempt_log_retention_seconds)),
                      publisher=Publisher(producer, results.name, results.partitions),
                      metrics=metrics).start()
    unread = UnreadBacklog()
    metrics.watch(owner=owner, unread=unread, priorities={
        task_topic(config.topic_prefix, tier): tier for tier in PRIORITY_TIERS})
    intake = Intake(owner=owner, tasks=tasks, functions=functions, tenants=tenants,
                    unread=unread)
    partitions = PartitionConsumer(owner=owner, intake=intake, unread=unread)
    consumer = Consumer(bootstrap=config.kafka_bootstrap,
                        group_id=f"{config.topic_prefix}-dispatchers", client_id=owner_name,
                        topics=[task_topic(config.topic_prefix, t) for t in PRIORITY_TIERS],
                        on_assigned=partitions.assigned, on_revoked=partitions.revoked,
                        # Static membership: a dispatcher restarted in its place (same host
                        # and port) takes its partitions back at once, without a rebalance.
                        instance_id=f"dispatcher-{config.advertise_host}:{server.port}")
    adoption = Adoption(owner=owner, owners=owners, index=index, tasks=tasks,
                        functions=functions, timers=timers, owner_name=owner_name, lease=lease,
                        resume=partitions.resume)
    partitions.bind(consumer, adoption)
    router = router_pb2_grpc.RouterServiceStub(tls.Credentials.of(config, "dispatcher").channel(
        config.router_address, "router"))
    limits = Periodic("limit-shares", 0.02, LimitSync(
        owner=owner, router=router, dispatcher_id=owner_name, unread=unread).step).start()
    # Its own thread: a slow call to the router must not hold rate-limited tasks back, or
    # a bucket full for that long drops the tokens it would have earned.
    pacing = Periodic("limit-pace", PACE_EVERY_SECONDS, owner.pace).start()

    started: list[service.Started] = []
    # A dead loop takes no more tasks: NOT_SERVING, then exit 1 (its partitions move to the
    # other dispatchers meanwhile).
    tiers = {task_topic(config.topic_prefix, t): n for n, t in enumerate(PRIORITY_TIERS)}
    loop = ConsumerLoop(consumer, intake.offer, name="dispatcher", between=partitions.between,
                        on_death=lambda exc: started[0].fail(), rank=tiers.__getitem__)

    def drain() -> None:
        function_changes.stop()
        loop.stop()
        pacing.stop()
        limits.stop()
        flusher.stop()
        timers.stop()

    def shutdown() -> None:
        producer.close()
        close(session)

    started.append(service.Started(server=server, drain=drain, close=shutdown))
    loop.start()
    return started[0]


if __name__ == "__main__":
    service.run("dispatcher", start)
