"""Submissions in flight to Kafka (`submissions`): what a gateway crash may leave unqueued.

A gateway lists a submission's tasks before it stores them and marks the submission
produced once every Kafka record is acknowledged. The sweeper reads the minutes that ended a
grace time ago and queues again the tasks of any submission never marked produced (the
records it produces ask their owner to check the task's state first, since some may have
reached Kafka before the crash). Rows expire after a day; nothing here is deleted.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cassandra.cluster import ResponseFuture, Session
from cassandra.util import uuid_from_time
from weir.storage.v1 import records_pb2

from libs.cassandra.partition_index import minute_of
from libs.cassandra.taskstate import TaskKey

SHARDS = 4


@dataclass(frozen=True)
class Submission:
    minute: datetime
    shard: int
    id: uuid.UUID

    @classmethod
    def new(cls, now: datetime) -> Submission:
        id_ = uuid_from_time(now)
        return cls(minute_of(now), zlib.crc32(id_.bytes) % SHARDS, id_)


class SubmissionStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO submissions (minute, shard, id, tasks) VALUES (?, ?, ?, ?)")
        self._produced = p("UPDATE submissions SET produced = true "
                           "WHERE minute = ? AND shard = ? AND id = ?")
        self._select = p("SELECT id, produced FROM submissions WHERE minute = ? AND shard = ?")
        self._select_tasks = p("SELECT tasks FROM submissions "
                               "WHERE minute = ? AND shard = ? AND id = ?")

    def begin(self, submission: Submission, keys: Sequence[TaskKey]) -> ResponseFuture:
        record = records_pb2.SubmissionRecord(tasks=[
            records_pb2.SubmittedTask(tenant_id=k.tenant_id, task_id=k.task_id) for k in keys])
        return self._session.execute_async(self._insert, (
            submission.minute, submission.shard, submission.id, record.SerializeToString()))

    def produced(self, submission: Submission) -> ResponseFuture:
        return self._session.execute_async(self._produced, (
            submission.minute, submission.shard, submission.id))

    def unconfirmed(self, minute: datetime) -> list[tuple[Submission, list[TaskKey]]]:
        """Submissions of one minute never marked produced, with their tasks.

        The task lists (tens of KB for a batch) are read only for those: nearly every
        submission was confirmed, and a sweeper reads every minute.
        """
        pending = [Submission(minute, shard, row.id) for shard in range(SHARDS)
                   for row in self._session.execute(self._select, (minute, shard))
                   if not row.produced]
        found = []
        for submission in pending:
            row = self._session.execute(self._select_tasks, (
                submission.minute, submission.shard, submission.id)).one()
            if row is None or row.tasks is None:
                continue  # expired meanwhile, or only the confirmation's row
            record = records_pb2.SubmissionRecord.FromString(row.tasks)
            found.append((submission, [TaskKey(t.tenant_id, t.task_id) for t in record.tasks]))
        return found


def minutes_between(start: datetime, end: datetime) -> list[datetime]:
    """Every minute bucket from ``start``'s to ``end``'s, inclusive."""
    minutes, minute = [], minute_of(start)
    while minute <= end:
        minutes.append(minute)
        minute += timedelta(minutes=1)
    return minutes
