"""Producer: a client whose every send has failed for a while is replaced by a new one."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from libs.kafka.client import REPLACE_AFTER_SECONDS, Producer, Record


class Future:
    def __init__(self, error: KafkaError | None) -> None:
        self.error = error

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


class Client:
    """Stands in for kafka-python's KafkaProducer: its sends fail while ``wedged``."""

    def __init__(self, wedged: bool) -> None:
        self.wedged, self.closed, self.sent = wedged, False, 0

    def send(self, topic: str, **_: object) -> Future:
        self.sent += 1
        return Future(KafkaTimeoutError("no producer id") if self.wedged else None)

    def close(self, timeout: float) -> None:
        self.closed = True


def test_a_wedged_client_is_replaced_after_its_sends_failed_for_a_while():
    now = [0.0]
    made: list[Client] = []
    outage = [True]

    def make() -> Client:
        if len(made) == 1 and outage[0]:
            raise KafkaConnectionError("refused")  # the first replacement, while the broker is away
        made.append(Client(wedged=not made))  # the first client is the wedged one
        return made[-1]

    producer = Producer(bootstrap="unused:9092", client_id="t", make=make,  # type: ignore[arg-type]
                        clock=lambda: now[0], in_background=lambda work: work())
    record = [Record("t", b"x")]
    for at in (0.0, 10.0, REPLACE_AFTER_SECONDS - 1):
        now[0] = at
        with pytest.raises(KafkaError):
            producer.send_all(record, timeout_seconds=0.01)
    assert len(made) == 1  # failing, but not yet for long
    now[0] = REPLACE_AFTER_SECONDS + 1
    with pytest.raises(KafkaError):
        producer.send_all(record)  # the replacement fails: the old client is kept
    assert len(made) == 1 and not made[0].closed
    outage[0] = False
    now[0] = 2 * REPLACE_AFTER_SECONDS + 2  # a while after the failed replacement
    with pytest.raises(KafkaError):
        producer.send_all(record)  # this failure replaces it
    assert len(made) == 2
    assert made[0].closed
    producer.send_all(record)
    assert made[1].sent == 1 and made[0].sent == 5
