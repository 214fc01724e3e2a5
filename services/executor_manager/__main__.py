"""Runs the executor-manager: ``python -m services.executor_manager``."""

import tempfile
from datetime import timedelta
from pathlib import Path

from libs import service, tls
from libs.config import WeirConfig
from services.executor_manager import metrics
from services.executor_manager.engine import Executor
from services.executor_manager.pool import WorkerPool, WorkerSandbox
from services.executor_manager.server import create_server


def high_reserve(config: WeirConfig) -> int:
    """The slots kept for HIGH work: a share of them all, leaving at least one for the rest."""
    capacity = config.worker_processes * config.worker_slots
    return min(capacity - 1, int(capacity * config.executor_high_reserve + 1e-9))


def start(config: WeirConfig) -> service.Started:
    credentials = tls.Credentials.of(config, "executor-manager")
    lease = timedelta(seconds=config.lease_seconds)
    executor_box: list[Executor] = []
    pool = WorkerPool(size=config.worker_processes, slots=config.worker_slots,
                      socket_dir=Path(tempfile.mkdtemp(prefix="weir-workers-")),
                      sandbox=WorkerSandbox.of(config),
                      on_start=lambda attempt_id, at: executor_box[0].started(attempt_id, at),
                      on_done=lambda results: executor_box[0].done(results),
                      high_reserve=high_reserve(config))
    executor = Executor(executor_id="", pool=pool, lease=lease)
    executor_box.append(executor)
    pool.start()
    metrics.watch(pool)
    server = create_server(config, executor=executor)
    executor.executor_id = config.executor_id or f"{config.advertise_host}:{server.port}"
    executor.connect([a.strip() for a in config.dispatcher_addresses.split(",") if a.strip()],
                     lambda address: credentials.channel(address, "dispatcher"))

    def drain() -> None:
        executor.drain(timedelta(seconds=config.shutdown_grace_seconds))
        executor.stop()

    return service.Started(server=server, drain=drain, close=pool.close)


if __name__ == "__main__":
    service.run("executor-manager", start)
