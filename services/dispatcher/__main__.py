"""Runs the dispatcher: ``python -m services.dispatcher``."""

from libs import service
from libs.config import WeirConfig
from services.dispatcher.server import create_server


def start(config: WeirConfig) -> service.Started:
    return service.Started(server=create_server(config))


if __name__ == "__main__":
    service.run("dispatcher", start)
