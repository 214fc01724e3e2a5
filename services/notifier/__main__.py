"""Runs the notifier: ``python -m services.notifier``."""

from libs import service
from libs.cassandra.functions import FunctionChangeFeed, FunctionStore
from libs.cassandra.session import close, connect
from libs.cassandra.taskstate import TaskStateStore
from libs.cassandra.tenants import TenantStore
from libs.config import WeirConfig
from libs.kafka.client import Consumer
from libs.kafka.topics import results_topic
from services.notifier.engine import DeliveryStore, Notifier, WebhookSender
from services.notifier.metrics import NotifierMetrics
from services.notifier.server import create_server
from services.notifier.watch import Watchers


def start(config: WeirConfig) -> service.Started:
    session = connect(config)
    tasks = TaskStateStore(session)
    watchers = Watchers()
    sender = WebhookSender(deliveries=DeliveryStore(session),
                           timeout_seconds=config.webhook_timeout_seconds,
                           allow_private=config.webhook_allow_private,
                           metrics=NotifierMetrics()).start()
    consumer = Consumer(bootstrap=config.kafka_bootstrap,
                        group_id=f"{config.topic_prefix}-notifiers", client_id="notifier",
                        topics=[results_topic(config.topic_prefix)])
    started: list[service.Started] = []
    functions = FunctionStore(session)
    notifier = Notifier(consumer=consumer, tenants=TenantStore(session),
                        functions=functions, sender=sender, watchers=watchers,
                        on_death=lambda: started[0].fail())
    function_changes = FunctionChangeFeed(functions, on_change=notifier.function_changed,
                                          on_lost=notifier.functions_lost).start()
    server = create_server(config, tasks=tasks, watchers=watchers)

    def drain() -> None:
        function_changes.stop()
        notifier.stop()
        sender.stop()

    started.append(service.Started(server=server, drain=drain, close=lambda: close(session)))
    notifier.start()
    return started[0]


if __name__ == "__main__":
    service.run("notifier", start)
