"""Runs the executor-manager: ``python -m services.executor_manager``."""

import tempfile
from datetime import timedelta
from pathlib import Path

from libs import service, tls
from libs.cassandra.functions import FunctionStore
from libs.cassandra.session import close, connect
from libs.config import WeirConfig
from libs.kafka.client import Producer
from libs.lifecycle import Lifecycle
from libs.periodic import Periodic
from services.executor_manager.engine import Executor
from services.executor_manager.pool import WorkerPool, WorkerSandbox
from services.executor_manager.reporter import LoadReporter
from services.executor_manager.server import create_server


def start(config: WeirConfig) -> service.Started:
    credentials = tls.Credentials.of(config, "executor-manager")
    session = connect(config)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="executor-manager")
    pool = WorkerPool(size=config.worker_processes,
                      socket_dir=Path(tempfile.mkdtemp(prefix="weir-workers-")),
                      sandbox=WorkerSandbox.of(config))
    pool.start()
    lease = timedelta(seconds=config.lease_seconds)
    reporter_box: list[LoadReporter] = []
    lifecycle = Lifecycle.of_service(session, producer, service="executor-manager",
                                     topic_prefix=config.topic_prefix)
    executor = Executor(executor_id="", lifecycle=lifecycle, functions=FunctionStore(session),
                        pool=pool, lease=lease,
                        on_load_change=lambda: reporter_box and reporter_box[0].changed())
    server = create_server(config, executor=executor)
    address = f"{config.advertise_host}:{server.port}"
    executor.executor_id = config.executor_id or address
    reporter = LoadReporter(executor_id=executor.executor_id, address=address,
                            dispatchers=[a.strip() for a in config.dispatcher_addresses.split(",")
                                         if a.strip()], load=executor.load,
                            channel_for=lambda a: credentials.channel(a, "dispatcher")).start()
    reporter_box.append(reporter)
    renewer = Periodic("lease-renewer", config.lease_seconds / 3, executor.renew_leases).start()

    def drain() -> None:
        executor.drain(config.shutdown_grace_seconds)
        renewer.stop()
        reporter.stop()

    def shutdown() -> None:
        pool.close()
        producer.close()
        close(session)

    return service.Started(server=server, drain=drain, close=shutdown)


if __name__ == "__main__":
    service.run("executor-manager", start)
