"""Runs the gateway: ``python -m services.gateway``."""

from libs import service
from libs.cassandra.session import close, connect
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from services.gateway.server import create_server


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    server = create_server(config, tenants=TenantStore(session))
    return service.Started(server=server, close=lambda: close(session))


if __name__ == "__main__":
    service.run("gateway", start)
