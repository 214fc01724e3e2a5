"""Runs the dispatcher: ``python -m services.dispatcher``."""

import functools
from datetime import timedelta

from weir.internal.executor_manager.v1 import executor_manager_pb2_grpc

from libs import service, tls
from libs.cassandra.functions import FunctionStore
from libs.cassandra.parked import ParkedStore
from libs.cassandra.session import close, connect
from libs.cassandra.timers import TimerStore
from libs.config import WeirConfig
from libs.kafka.client import Consumer, Producer
from libs.kafka.topics import PRIORITY_TIERS, task_topic
from libs.lifecycle import Lifecycle
from libs.periodic import Periodic
from services.dispatcher.engine import Dispatcher, ExecutorDirectory, LeaseSweeper
from services.dispatcher.server import create_server
from services.dispatcher.timers import TimerFirer, TimerPoller

TIMER_POLL_SECONDS = 0.2  # under the poller's 1 s lookahead, so no timer is read late


def start(config: WeirConfig) -> service.Started:
    credentials = tls.Credentials.of(config, "dispatcher")
    session = connect(config)
    producer = Producer(bootstrap=config.kafka_bootstrap, client_id="dispatcher")
    lifecycle = Lifecycle.of_service(session, producer, service="dispatcher",
                                     topic_prefix=config.topic_prefix)
    functions = FunctionStore(session)
    directory = ExecutorDirectory()
    server = create_server(config, directory=directory)
    dispatcher_id = f"{config.advertise_host}:{server.port}"
    consumer = Consumer(bootstrap=config.kafka_bootstrap, group_id=f"{config.topic_prefix}"
                        "-dispatchers", client_id=f"dispatcher-{dispatcher_id}",
                        topics=[task_topic(config.topic_prefix, t) for t in PRIORITY_TIERS])

    @functools.cache
    def stub_for(address: str) -> executor_manager_pb2_grpc.ExecutorServiceStub:
        # The executor must prove it is one: a reported address alone gets no task.
        return executor_manager_pb2_grpc.ExecutorServiceStub(
            credentials.channel(address, "executor-manager"))

    dispatcher = Dispatcher(dispatcher_id=dispatcher_id, lifecycle=lifecycle,
                            functions=functions, parked=ParkedStore(session), consumer=consumer,
                            directory=directory, lease=timedelta(seconds=config.lease_seconds),
                            stub_for=stub_for).start()
    sweeper = Periodic("lease-sweeper", config.sweep_interval_seconds,
                       LeaseSweeper(lifecycle=lifecycle, functions=functions).sweep).start()
    timers = TimerPoller(timers=TimerStore(session), fire=TimerFirer(lifecycle)).start()
    timer_polls = Periodic("timer-poller", TIMER_POLL_SECONDS, timers.poll).start()

    def drain() -> None:
        timer_polls.stop()
        timers.stop()
        sweeper.stop()
        dispatcher.stop()

    def shutdown() -> None:
        producer.close()
        close(session)

    return service.Started(server=server, drain=drain, close=shutdown)


if __name__ == "__main__":
    service.run("dispatcher", start)
