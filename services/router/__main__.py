"""Runs the router: ``python -m services.router``."""

import time

from libs import service
from libs.cassandra.session import close, connect
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.kafka.topics import PRIORITY_TIERS, task_topic
from libs.periodic import Periodic
from services.router import metrics
from services.router.backlog import Backlogs
from services.router.engine import RouteTable
from services.router.hot import HotTenants, Isolator
from services.router.limits import Allocator
from services.router.server import create_server

ISOLATE_SECONDS = 1.0  # how often the router looks for hot tenants to move


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    tenants = TenantStore(session)
    routes = RouteTable(session, topic_prefix=config.topic_prefix,
                        partitions=config.task_partitions, shard_size=config.shard_size,
                        tenant_exists=lambda tenant_id: tenants.get_tenant(tenant_id) is not None)
    backlogs = Backlogs()
    pool = range(config.task_partitions, config.task_partitions + config.isolated_partitions)
    hot = HotTenants(pool=pool, shard_size=config.shard_size,
                     threshold=config.hot_tenant_backlog, drained=config.hot_tenant_drained,
                     hold=config.hot_tenant_seconds, clock=time.monotonic)
    isolator = Periodic("isolator", ISOLATE_SECONDS, Isolator(
        hot=hot, routes=routes, backlogs=backlogs).step).start()
    metrics.watch(backlogs=backlogs, hot=hot, priorities={
        task_topic(config.topic_prefix, tier): tier for tier in PRIORITY_TIERS})

    def close_all() -> None:
        isolator.stop()
        close(session)

    return service.Started(server=create_server(config, routes=routes, allocator=Allocator(),
                                                 backlogs=backlogs), close=close_all)


if __name__ == "__main__":
    service.run("router", start)
