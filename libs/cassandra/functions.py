"""Functions in Cassandra, one partition per tenant, ordered by name, and a log of their
changes that services follow (`FunctionChangeFeed`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from cassandra.cluster import Session
from weir.storage.v1 import records_pb2
from weir.v1 import functions_pb2

from libs.cassandra.taskstate import now_utc, timestamp_of
from libs.periodic import Periodic

# How late a change row may become readable after its change_time (taken before the write):
# each read looks back this far, and ignores what it already saw.
CHANGE_LOOKBACK = timedelta(seconds=2)
# How often each process reads the log: the bound (with a read) on how late a change to a
# function (an update, a pause) applies to its tasks, documented in functions.proto.
FUNCTION_CHANGE_POLL_SECONDS = 0.25


class FunctionStore:
    def __init__(self, session: Session) -> None:
        self._session = session
        p = session.prepare
        self._insert = p("INSERT INTO functions (tenant_id, name, state, update_time, record) "
                         "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS")
        self._update = p("UPDATE functions SET state = ?, update_time = ?, record = ? "
                         "WHERE tenant_id = ? AND name = ? IF EXISTS")
        self._select = p("SELECT state, record FROM functions WHERE tenant_id = ? AND name = ?")
        self._list = p("SELECT state, record FROM functions WHERE tenant_id = ? AND name > ? "
                       "LIMIT ?")
        self._delete = p("DELETE FROM functions WHERE tenant_id = ? AND name = ? IF EXISTS")
        self._log_change = p("INSERT INTO function_changes (minute, change_time, tenant_id, "
                             "name) VALUES (?, ?, ?, ?)")
        self._changes = p("SELECT change_time, tenant_id, name FROM function_changes "
                          "WHERE minute IN ? AND change_time > ?")

    def create(self, tenant_id: str, function: functions_pb2.Function) -> bool:
        """Stores a new function (ACTIVE); False when the name is taken."""
        now = now_utc()
        function.state = functions_pb2.FunctionState.FUNCTION_STATE_ACTIVE
        function.create_time.CopyFrom(timestamp_of(now))
        function.update_time.CopyFrom(timestamp_of(now))
        record = records_pb2.FunctionRecord(tenant_id=tenant_id, function=function)
        created = self._session.execute(self._insert, (
            tenant_id, function.name, function.state, now, record.SerializeToString())).was_applied
        if created:  # a name deleted a moment ago may still be cached as absent
            self._changed(tenant_id, function.name)
        return created

    def update(self, tenant_id: str, function: functions_pb2.Function) -> bool:
        """Replaces a function's settings and state; False when it does not exist."""
        now = now_utc()
        function.update_time.CopyFrom(timestamp_of(now))
        record = records_pb2.FunctionRecord(tenant_id=tenant_id, function=function)
        updated = self._session.execute(self._update, (
            function.state, now, record.SerializeToString(), tenant_id,
            function.name)).was_applied
        if updated:
            self._changed(tenant_id, function.name)
        return updated

    def get(self, tenant_id: str, name: str) -> functions_pb2.Function | None:
        row = self._session.execute(self._select, (tenant_id, name)).one()
        return self._function(row) if row else None

    def list(self, tenant_id: str, *, after: str, limit: int) -> list[functions_pb2.Function]:
        """Functions named after ``after`` (exclusive), by name."""
        return [self._function(r) for r in self._session.execute(self._list,
                                                                   (tenant_id, after, limit))]

    def delete(self, tenant_id: str, name: str) -> bool:
        deleted = self._session.execute(self._delete, (tenant_id, name)).was_applied
        if deleted:
            self._changed(tenant_id, name)
        return deleted

    def changes(self, since: datetime) -> Sequence[tuple[datetime, str, str]]:
        """(change_time, tenant_id, name) of the changes after ``since`` (at most a minute
        ago)."""
        minutes = sorted({_minute(since), _minute(now_utc())})
        return [(r.change_time.replace(tzinfo=UTC), r.tenant_id, r.name)
                for r in self._session.execute(self._changes, (minutes, since))]

    def _changed(self, tenant_id: str, name: str) -> None:
        when = now_utc()
        self._session.execute(self._log_change, (_minute(when), when, tenant_id, name))

    @staticmethod
    def _function(row) -> functions_pb2.Function:
        function = records_pb2.FunctionRecord.FromString(row.record).function
        function.state = row.state
        return function


def _minute(when: datetime) -> int:
    return int(when.timestamp()) // 60


class FunctionChangeFeed:
    """Tells a process's caches which functions changed, from the change log: `poll` runs
    every `FUNCTION_CHANGE_POLL_SECONDS` (`start`), so a change made through any gateway
    reaches every process within about that (plus a read). When a poll fails, ``on_lost`` is
    called (drop everything cached: a change may have been missed)."""

    def __init__(self, store: FunctionStore, *, on_change: Callable[[str, str], None],
                 on_lost: Callable[[], None]) -> None:
        self._store = store
        self._on_change = on_change
        self._on_lost = on_lost
        self._seen: set[tuple[datetime, str, str]] = set()  # within the reads' look-back
        self._since = now_utc()

    def start(self) -> Periodic:
        return Periodic("function-changes", FUNCTION_CHANGE_POLL_SECONDS, self.poll).start()

    def poll(self) -> None:
        since, self._since = self._since, now_utc()
        try:
            changes = self._store.changes(since - CHANGE_LOOKBACK)
        except Exception:
            self._on_lost()  # what changed until now is re-read; later changes, next poll
            raise
        for change in changes:
            if change not in self._seen:
                self._on_change(change[1], change[2])
        # The next read looks back from this one's start: older changes never come again.
        self._seen = {c for c in self._seen.union(changes) if c[0] > self._since - CHANGE_LOOKBACK}
