"""Runs the router: ``python -m services.router``."""

from libs import service
from libs.cassandra.session import close, connect
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from services.router.backlog import Backlogs
from services.router.engine import RouteTable
from services.router.limits import Allocator
from services.router.server import create_server


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    tenants = TenantStore(session)
    routes = RouteTable(session, topic_prefix=config.topic_prefix,
                        partitions=config.task_partitions, shard_size=config.shard_size,
                        tenant_exists=lambda tenant_id: tenants.get_tenant(tenant_id) is not None)
    return service.Started(server=create_server(config, routes=routes, allocator=Allocator(),
                                                 backlogs=Backlogs()),
                           close=lambda: close(session))


if __name__ == "__main__":
    service.run("router", start)
