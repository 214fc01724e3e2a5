"""Runs the dispatcher: ``python -m services.dispatcher``."""

import functools
from datetime import timedelta

import grpc
from weir.internal.executor_manager.v1 import executor_manager_pb2_grpc

from libs import service
from libs.cassandra.session import close, connect
from libs.cassandra.tasks import TaskStore
from libs.config import WeirConfig
from libs.kafka.client import Consumer, Producer
from libs.kafka.topics import PRIORITY_TIERS, task_topic
from libs.periodic import Periodic
from services.dispatcher.engine import Dispatcher, ExecutorDirectory, LeaseSweeper
from services.dispatcher.server import create_server


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    tasks = TaskStore(session, service="dispatcher")
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="dispatcher")
    directory = ExecutorDirectory()
    server = create_server(config, directory=directory)
    dispatcher_id = f"{config.advertise_host}:{server.port}"
    consumer = Consumer(bootstrap=config.kafka_bootstrap, group_id=f"{config.topic_prefix}"
                        "-dispatchers", client_id=f"dispatcher-{dispatcher_id}",
                        topics=[task_topic(config.topic_prefix, t) for t in PRIORITY_TIERS])

    @functools.cache
    def stub_for(address: str) -> executor_manager_pb2_grpc.ExecutorServiceStub:
        return executor_manager_pb2_grpc.ExecutorServiceStub(grpc.insecure_channel(address))

    dispatcher = Dispatcher(dispatcher_id=dispatcher_id, tasks=tasks, consumer=consumer,
                            directory=directory, lease=timedelta(seconds=config.lease_seconds),
                            stub_for=stub_for).start()
    sweeper = Periodic("lease-sweeper", config.sweep_interval_seconds,
                       LeaseSweeper(tasks=tasks, producer=producer).sweep).start()

    def drain() -> None:
        sweeper.stop()
        dispatcher.stop()

    def shutdown() -> None:
        producer.close()
        close(session)

    return service.Started(server=server, drain=drain, close=shutdown)


if __name__ == "__main__":
    service.run("dispatcher", start)
