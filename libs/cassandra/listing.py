"""The listing of a tenant's tasks (`tasks_by_day`): newest first, one partition per day.

The gateway writes a task's row when it creates the task and deletes it with the task; the
task itself lives in `task_state` (`libs.cassandra.taskstate`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime

from cassandra.cluster import ResponseFuture, Session
from cassandra.query import BatchStatement, BatchType
from weir.storage.v1 import records_pb2


class TaskListing:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO tasks_by_day (tenant_id, day, create_time, task_id, "
                         "function) VALUES (?, ?, ?, ?, ?)")
        self._delete = p("DELETE FROM tasks_by_day WHERE tenant_id = ? AND day = ? "
                         "AND create_time = ? AND task_id = ?")
        listing = "SELECT create_time, task_id FROM tasks_by_day WHERE tenant_id = ? AND day = ? "
        self._older = p(listing + "AND create_time < ? LIMIT ?")
        self._from = p(listing + "AND create_time <= ? LIMIT ?")
        self._same_time = p(listing + "AND create_time = ? AND task_id > ? LIMIT ?")

    def add(self, specs: Iterable[records_pb2.TaskSpec]) -> list[ResponseFuture]:
        """Lists new tasks: one unlogged batch per (tenant, day), so each batch is a single
        partition's mutation (no coordinator batch log, no size limit of multi-partition
        batches)."""
        groups: dict[tuple[str, date], BatchStatement] = {}
        for spec in specs:
            task = spec.task
            created = task.create_time.ToDatetime(tzinfo=UTC)
            key = (spec.tenant_id, created.date())
            batch = groups.get(key)
            if batch is None:
                batch = groups[key] = BatchStatement(batch_type=BatchType.UNLOGGED)
            batch.add(self._insert, (spec.tenant_id, key[1], created, task.task_id,
                                     task.function))
        return [self._session.execute_async(batch) for batch in groups.values()]

    def remove(self, spec: records_pb2.TaskSpec) -> None:
        created = spec.task.create_time.ToDatetime(tzinfo=UTC)
        self._session.execute(self._delete, (spec.tenant_id, created.date(), created,
                                             spec.task.task_id))

    def page(self, tenant_id: str, *, day: date, before: datetime, after_task_id: str,
             limit: int) -> list[tuple[datetime, str]]:
        """(create_time, task_id) of one day-partition, newest first, from the position
        (``before``, ``after_task_id``) on: rows listed after it, i.e. created at ``before``
        with a larger task ID (a batch's tasks share one creation time), then created
        earlier. Without ``after_task_id``, from ``before`` itself on."""
        if not after_task_id:
            rows = list(self._session.execute(self._from, (tenant_id, day, before, limit)))
        else:
            rows = list(self._session.execute(self._same_time,
                                              (tenant_id, day, before, after_task_id, limit)))
            if len(rows) < limit:
                rows += self._session.execute(self._older,
                                              (tenant_id, day, before, limit - len(rows)))
        return [(r.create_time.replace(tzinfo=UTC), r.task_id) for r in rows]
