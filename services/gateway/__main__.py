"""Runs the gateway: ``python -m services.gateway``."""

from datetime import timedelta

import grpc
from weir.internal.notifier.v1 import notifier_pb2_grpc
from weir.internal.router.v1 import router_pb2, router_pb2_grpc

from libs import service
from libs.cassandra.dedup import DedupStore
from libs.cassandra.functions import FunctionStore
from libs.cassandra.session import close, connect
from libs.cassandra.tasks import TaskStore
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.kafka.client import Producer
from libs.periodic import Periodic
from services.gateway.engine import Submitter
from services.gateway.server import create_server


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="gateway")
    router = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(config.router_address))
    notifier = notifier_pb2_grpc.NotifierServiceStub(
        grpc.insecure_channel(config.notifier_address))
    tasks = TaskStore(session, service="gateway")
    functions = FunctionStore(session)

    def route(tenant_id: str, function: str, priority: int) -> router_pb2.Route:
        return router.GetRoute(router_pb2.GetRouteRequest(
            tenant_id=tenant_id, function=function, priority=priority), timeout=5)

    submitter = Submitter(tasks=tasks, functions=functions, dedup=DedupStore(session),
                          route=route, producer=producer,
                          crash_after_store=config.fault == "gateway.crash_after_store")
    sweeper = Periodic("unqueued-sweeper", config.sweep_interval_seconds, lambda:
                       submitter.sweep_unqueued(
                           grace=timedelta(seconds=config.unqueued_grace_seconds))).start()
    server = create_server(config, tenants=TenantStore(session), submitter=submitter,
                           tasks=tasks, functions=functions, notifier=notifier)

    def shutdown() -> None:
        producer.close()
        close(session)

    return service.Started(server=server, drain=sweeper.stop, close=shutdown)


if __name__ == "__main__":
    service.run("gateway", start)
