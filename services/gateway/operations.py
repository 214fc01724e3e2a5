"""Long-running operations: batch cancel, batch delete and dead-letter re-drive.

Any gateway may run any operation. Each runner looks for active operations nobody works on
(a fresh one, or one whose owner's heartbeat went silent), claims it, and works through its
items at the operation's rate with a few in flight, checkpointing progress and its scan
position about twice a second. Items are processed idempotently, so a take-over that repeats
the last few is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from google.rpc import code_pb2, status_pb2
from weir.storage.v1 import records_pb2
from weir.v1 import operations_pb2

from libs.cassandra.dead_letters import DeadLetterStore
from libs.cassandra.dedup import DedupStore
from libs.cassandra.operations import OperationStore, StoredOperation
from libs.cassandra.taskstate import FINAL_STATES, now_utc, timestamp_of
from libs.errors import InvalidArgument, NotFound
from services.gateway.control import ScanPosition, TaskControl, scan_tasks
from services.gateway.engine import FUNCTION_CACHE_SECONDS
from services.gateway.filters import DeadLetterFilter, TaskFilter
from services.gateway.validation import check_operation_name

log = logging.getLogger(__name__)

OpState = operations_pb2.OperationState
Kind = records_pb2.OperationKind
FINAL = frozenset({OpState.OPERATION_STATE_SUCCEEDED, OpState.OPERATION_STATE_FAILED,
                   OpState.OPERATION_STATE_CANCELLED})
CHECKPOINT_SECONDS = 0.5
IN_FLIGHT = 8  # items processed at once by one operation
REQUEST_ID_WINDOW = timedelta(hours=24)
WAIT_DEFAULT_SECONDS = 30.0  # WaitOperation's timeout when unset (operations.proto)
WAIT_MAX_SECONDS = 60.0  # bounded: a waiter holds a server thread
WAIT_POLL_SECONDS = 0.25  # how often a waiter reads the operation (runners save twice a second)
WAIT_ANSWER_MARGIN = 0.2  # seconds before the caller's deadline a waiter stops to answer

# An item of work: (scan position after it, the action; True when done, False when skipped).
Item = tuple[str, Callable[[], bool]]


def new_operation(tenant_id: str, kind: Kind, description: str, *, filter: str = "",
                  task_ids: Sequence[str] = (), payload_override: bytes | None = None,
                  function: str = "", items_per_second: float) -> records_pb2.OperationRecord:
    operation = operations_pb2.Operation(
        name=f"op-{uuid.uuid4().hex}", description=description,
        state=OpState.OPERATION_STATE_PENDING, create_time=timestamp_of(now_utc()))
    record = records_pb2.OperationRecord(tenant_id=tenant_id, operation=operation, kind=kind,
                                         filter=filter, task_ids=task_ids, function=function,
                                         items_per_second=items_per_second)
    if payload_override is not None:
        record.payload_override = payload_override
    return record


class OperationStarter:
    """Starts, reads and cancels operations on behalf of the API (runners do the work)."""

    def __init__(self, *, operations: OperationStore, dedup: DedupStore) -> None:
        self._operations = operations
        self._dedup = dedup

    def start(self, tenant_id: str, record: records_pb2.OperationRecord, *,
              request_id: str = "") -> operations_pb2.Operation:
        """Stores the operation for a runner to pick up; a repeated ``request_id`` returns the
        operation the first call started."""
        if request_id:
            # "/" is in no task ID: operations' request IDs are a namespace of their own.
            claim = self._dedup.claim(tenant_id, "operation/" + request_id,
                                      record.operation.name, window=REQUEST_ID_WINDOW)
            if not claim.granted:
                return self._repeat(tenant_id, claim.task_id)
        self._operations.create(record)
        return record.operation

    def _repeat(self, tenant_id: str, name: str) -> operations_pb2.Operation:
        """The operation a first call started; listed for the runners again, in case that
        call failed between storing and listing it."""
        operation = self.get(tenant_id, name)
        if operation.state not in FINAL:
            self._operations.activate(tenant_id, name)
        return operation

    def get(self, tenant_id: str, name: str) -> operations_pb2.Operation:
        check_operation_name(name)
        stored = self._operations.get(tenant_id, name)
        if stored is None:
            raise NotFound(f"operation {name!r} not found", reason="OPERATION_NOT_FOUND")
        return stored.record.operation

    def list(self, tenant_id: str, *, after: tuple[datetime, str] | None, limit: int
             ) -> tuple[list[operations_pb2.Operation], tuple[datetime, str] | None]:
        """Up to ``limit`` operations newest first after ``after``, and the position of the
        last one (None when the listing ended)."""
        rows = self._operations.page(tenant_id, after=after, limit=limit)
        found = []
        for row in rows:
            stored = self._operations.get(tenant_id, row[1])
            if stored is not None:
                found.append(stored.record.operation)
        return found, (rows[-1] if len(rows) == limit else None)

    async def wait(self, tenant_id: str, name: str, *, timeout: float,
                   call_deadline: float | None) -> operations_pb2.Operation:
        """Reads the operation until it is final, ``timeout`` seconds pass or the caller's
        deadline nears; returns it as it stands. A coroutine: a waiter holds no thread (a
        caller that leaves cancels it)."""
        until = time.monotonic() + timeout
        if call_deadline is not None:
            until = min(until, call_deadline - WAIT_ANSWER_MARGIN)
        while True:
            operation = await asyncio.to_thread(self.get, tenant_id, name)
            left = until - time.monotonic()
            if operation.state in FINAL or left <= 0:
                return operation
            await asyncio.sleep(min(WAIT_POLL_SECONDS, left))

    def cancel(self, tenant_id: str, name: str) -> operations_pb2.Operation:
        """Asks the operation to stop; it does at its next checkpoint (within a second)."""
        operation = self.get(tenant_id, name)
        if operation.state not in FINAL:
            self._operations.request_cancel(tenant_id, name)
        return operation


class OperationRunner:
    """Claims and runs operations; `poll` is called periodically."""

    def __init__(self, *, operations: OperationStore, control: TaskControl,
                 dead_letters: DeadLetterStore, owner: str,
                 silent_after: timedelta = timedelta(seconds=10)) -> None:
        self._operations = operations
        self._control = control
        self._dead_letters = dead_letters
        self._owner = owner
        self._silent_after = silent_after
        self._running: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="operation")

    def poll(self) -> None:
        for key in self._operations.active():
            with self._lock:
                if key in self._running:
                    continue
            stored = self._operations.get(*key)
            if stored is None or stored.record.operation.state in FINAL:
                self._operations.deactivate(*key)
                continue
            silent = (stored.heartbeat is None
                      or now_utc() - stored.heartbeat > self._silent_after)
            if silent and self._operations.claim(stored, owner=self._owner):
                with self._lock:
                    self._running.add(key)
                self._threads.submit(self._run, key)

    def stop(self) -> None:
        """Stops at the next checkpoint; another gateway takes the operations over."""
        self._stopping.set()
        self._threads.shutdown(wait=True)

    def _run(self, key: tuple[str, str]) -> None:
        try:
            stored = self._operations.get(*key)
            if stored is not None:
                self._work(stored)
        except Exception:
            log.exception("operation failed", extra={"operation": key[1]})
        finally:
            with self._lock:
                self._running.discard(key)

    def _work(self, stored: StoredOperation) -> None:
        record = stored.record
        op = record.operation
        op.state = OpState.OPERATION_STATE_RUNNING
        if not self._checkpoint(record):
            return
        pace = 1.0 / (record.items_per_second or 100)
        next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        try:
            with ThreadPoolExecutor(max_workers=IN_FLIGHT) as pool:
                chunk: list[Item] = []
                for item in self._items(record):
                    chunk.append(item)
                    op.matched_count += 1
                    if len(chunk) < IN_FLIGHT:
                        continue
                    started = time.monotonic()
                    self._process(pool, chunk, record)
                    chunk = []
                    time.sleep(max(0.0, pace * IN_FLIGHT - (time.monotonic() - started)))
                    if time.monotonic() >= next_checkpoint:
                        next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
                        if not self._checkpoint(record):
                            return
                self._process(pool, chunk, record)
            if record.kind == Kind.OPERATION_KIND_DELETE_FUNCTION:
                self._control.delete_function(record.tenant_id, record.function)
            op.state = OpState.OPERATION_STATE_SUCCEEDED
        except Exception as exc:  # noqa: BLE001 - reported in the operation itself
            log.exception("operation stopped by an error", extra={"operation": op.name})
            op.state = OpState.OPERATION_STATE_FAILED
            op.error.CopyFrom(status_pb2.Status(code=code_pb2.INTERNAL, message=str(exc)))
        op.end_time.CopyFrom(timestamp_of(now_utc()))
        if self._operations.save(record, owner=self._owner):
            self._operations.deactivate(record.tenant_id, op.name)

    def _process(self, pool: ThreadPoolExecutor, chunk: list[Item],
                 record: records_pb2.OperationRecord) -> None:
        if not chunk:
            return
        for done in pool.map(lambda item: item[1](), chunk):
            record.operation.processed_count += 1
            if not done:
                record.operation.failed_count += 1
        record.cursor = chunk[-1][0]

    def _checkpoint(self, record: records_pb2.OperationRecord) -> bool:
        """Saves progress; False when the operation must stop (cancelled, taken over, or
        this gateway is stopping)."""
        current = self._operations.get(record.tenant_id, record.operation.name)
        if current is not None and current.cancel_requested:
            record.operation.state = OpState.OPERATION_STATE_CANCELLED
            record.operation.end_time.CopyFrom(timestamp_of(now_utc()))
            if self._operations.save(record, owner=self._owner):
                self._operations.deactivate(record.tenant_id, record.operation.name)
            return False
        return self._operations.save(record, owner=self._owner) and not self._stopping.is_set()

    # --- the items of each kind -------------------------------------------------------------

    def _items(self, record: records_pb2.OperationRecord) -> Iterator[Item]:
        if record.kind == Kind.OPERATION_KIND_REDRIVE_DEAD_LETTERS:
            yield from self._dead_letter_items(record)
        else:
            yield from self._task_items(record)

    def _task_items(self, record: records_pb2.OperationRecord) -> Iterator[Item]:
        task_filter = TaskFilter.parse(record.filter)
        if record.cursor:
            position = ScanPosition.from_json(record.cursor)
        elif record.kind == Kind.OPERATION_KIND_DELETE_FUNCTION:
            # Every task of the function, also those a gateway accepted while its cache still
            # showed the function before DELETING: they are all in by then.
            settled = (record.operation.create_time.ToDatetime(tzinfo=UTC)
                       + timedelta(seconds=FUNCTION_CACHE_SECONDS))
            time.sleep(max(0.0, (settled - now_utc()).total_seconds()))
            position = ScanPosition.start()
        else:  # tasks created after the operation are not its business
            position = ScanPosition.start(record.operation.create_time.ToDatetime(tzinfo=UTC))
        delete = record.kind == Kind.OPERATION_KIND_DELETE_TASKS
        unfinished_only = record.kind == Kind.OPERATION_KIND_DELETE_FUNCTION
        control = self._control
        for after, stored in scan_tasks(control.tasks, control.listing, record.tenant_id,
                                        task_filter, position):
            cursor = after.to_json()
            if stored is None or (unfinished_only and stored.state in FINAL_STATES):
                continue
            # partial, not a lambda binding `stored` by default: mypy cannot type that.
            if delete:
                yield cursor, functools.partial(control.delete, stored)
            else:
                # Done once asked: the owner cancels it. A task already CANCELLED is done too
                # (a repeat after a take-over); one that ended otherwise is not.
                yield cursor, functools.partial(
                    control.request_cancel, stored,
                    reason=f"cancelled by {record.operation.name}")

    def _dead_letter_items(self, record: records_pb2.OperationRecord) -> Iterator[Item]:
        override = record.payload_override if record.HasField("payload_override") else None
        tenant = record.tenant_id

        def redrive(task_id: str) -> bool:
            letter = self._dead_letters.get(tenant, task_id)
            return letter is not None and self._control.redrive(
                tenant, letter, payload_override=override)

        if record.task_ids:
            start = int(record.cursor or 0)
            for index, task_id in enumerate(record.task_ids[start:], start=start):
                yield str(index + 1), functools.partial(redrive, task_id)
            return
        letter_filter = DeadLetterFilter.parse(record.filter)
        # Newest first; re-driven letters leave the listing behind the scan's mark.
        after = decode_mark(record.cursor)
        while True:
            rows = self._dead_letters.page(tenant, after=after, limit=200)
            if not rows:
                return
            for row in rows:
                after = (row.dead_letter_time, row.task_id)
                if letter_filter.matches(row):
                    yield encode_mark(after), functools.partial(redrive, row.task_id)


def encode_mark(mark: tuple[datetime, str]) -> str:
    """A dead-letter listing position as an opaque token."""
    return base64.urlsafe_b64encode(json.dumps(
        [mark[0].isoformat(), mark[1]]).encode()).decode()


def decode_mark(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        when, task_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(when), task_id
    except (ValueError, TypeError) as exc:
        raise InvalidArgument({"page_token": "not a token this API returned"}) from exc
