"""Runs the router: ``python -m services.router``."""

from libs import service
from libs.config import WeirConfig
from services.router.server import create_server


def start(config: WeirConfig) -> service.Started:
    return service.Started(server=create_server(config))


if __name__ == "__main__":
    service.run("router", start)
