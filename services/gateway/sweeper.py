"""The submission sweeper: queues the tasks of submissions a gateway never confirmed.

A gateway lists each submission before it stores the tasks and confirms it once their
records are on Kafka. A crash (or a Kafka failure) in between leaves the submission
unconfirmed; every gateway's sweeper reads the minutes that ended a grace time ago and
produces again the tasks of such submissions that are still waiting with no attempt, flagged
so that their owner checks the stored state first: some records may have reached Kafka, and
several gateways may sweep the same minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from weir.v1 import tasks_pb2

from libs.cassandra.partition_index import MINUTE, minute_of
from libs.cassandra.submissions import SubmissionStore, minutes_between
from libs.cassandra.taskstate import TaskStateStore, now_utc, timestamp_of
from libs.kafka.client import Producer
from libs.taskqueue import message_of, records_by_partition

log = logging.getLogger(__name__)

State = tasks_pb2.TaskState
# A task in these states and with no attempt yet may never have reached its owner.
UNSTARTED_STATES = frozenset({State.TASK_STATE_QUEUED, State.TASK_STATE_SCHEDULED})
# How far back a starting sweeper looks (submission rows live a day).
LOOK_BACK = timedelta(hours=1)


class SubmissionSweeper:
    """Sweeps each minute once, in order, from an in-memory cursor; `sweep` runs periodically.

    A minute that fails (Kafka or Cassandra trouble) stops the round and is swept again the
    next round, so no submission is skipped.
    """

    def __init__(self, *, submissions: SubmissionStore, tasks: TaskStateStore,
                 producer: Producer, grace: timedelta, look_back: timedelta = LOOK_BACK,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self._submissions = submissions
        self._tasks = tasks
        self._producer = producer
        self._grace = grace
        self._look_back = look_back
        self._clock = clock
        self._next: datetime | None = None  # the first minute not swept yet

    def sweep(self) -> int:
        """Sweeps every minute that ended more than the grace time ago and is not swept yet;
        returns how many tasks it produced."""
        now = self._clock()
        # Minute m ends at m + 1 minute; it is due once that is at least `grace` ago.
        last = minute_of(now - self._grace) - MINUTE
        start = self._next or minute_of(now - self._look_back)
        produced = 0
        for minute in minutes_between(start, last):
            produced += self.sweep_minute(minute)
            self._next = minute + MINUTE
        return produced

    def sweep_minute(self, minute: datetime) -> int:
        """Produces the waiting tasks of one minute's unconfirmed submissions and confirms
        them; returns how many tasks it produced."""
        produced = 0
        for submission, keys in self._submissions.unconfirmed(minute):
            found = self._tasks.get_many(keys, history=False)
            enqueued = timestamp_of(self._clock())
            # A task missing was never acknowledged (its creation failed half-way); one that
            # started or ended is known to its owner.
            messages = [(s.spec.topic, s.spec.partition,
                         message_of(s.spec, attempt_number=1, check_state=True,
                                    enqueue_time=enqueued))
                        for s in found if s is not None and s.state in UNSTARTED_STATES
                        and s.status.attempt_count == 0]
            if messages:
                self._producer.send_all(records_by_partition(messages))
                log.info("queued the tasks of an unconfirmed submission", extra={
                    "submission": str(submission.id), "tasks": len(messages)})
            self._submissions.produced(submission).result()
            produced += len(messages)
        return produced
