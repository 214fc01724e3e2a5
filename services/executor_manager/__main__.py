"""Runs the executor-manager: ``python -m services.executor_manager``."""

from libs import service
from libs.config import WeirConfig
from services.executor_manager.server import create_server


def start(config: WeirConfig) -> service.Started:
    return service.Started(server=create_server(config))


if __name__ == "__main__":
    service.run("executor-manager", start)
