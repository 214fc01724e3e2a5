"""TaskService.GetAttemptLog and ListAttemptLogs: what attempts' handlers wrote.

Logs are stored only for attempts that wrote something (`libs.cassandra.attempt_logs`);
every other attempt the task has had (1 to its `attempt_count`) reads as an empty log
without times, so a caller sees one log per attempt. The task is read first: another
tenant's task, or none, is NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from weir.v1 import tasks_pb2

from libs.cassandra.attempt_logs import AttemptLogStore, StoredLog
from libs.cassandra.taskstate import StoredTask
from libs.errors import InvalidArgument, NotFound
from libs.pagetoken import NOT_OURS, PageTokens
from services.gateway import validation

PAGE_SIZE = 10  # logs per page by default
MAX_PAGE_SIZE = 100
# A page ends once it holds this much text, so that with one more log (at most the cap,
# 1 MiB) it stays below the 4 MiB a gRPC client accepts by default.
PAGE_BYTES = 2 * 1024 * 1024
MAX_ATTEMPT = 2**31 - 1
LISTING = "attempt_logs"


def empty_log(task_id: str, attempt_number: int) -> tasks_pb2.AttemptLog:
    """The log of an attempt with nothing stored."""
    return tasks_pb2.AttemptLog(task_id=task_id, attempt_number=attempt_number)


def page_of_logs(task_id: str, stored: Iterable[StoredLog], *, start: int, attempt_count: int,
                 page_size: int, max_bytes: int = PAGE_BYTES
                 ) -> tuple[list[tasks_pb2.AttemptLog], int | None]:
    """One page of a task's logs from attempt ``start`` on, oldest first.

    Args:
        stored: the stored logs from ``start`` on, in order (at least ``page_size + 1`` of
            them when there are that many, so the end of the list is known).
        attempt_count: the task's attempts so far: each of 1..attempt_count gets a log, an
            empty one where none is stored (a stored log of a later attempt shows too: the
            owner writes it beside the task's new count, and a read may see it first).
        max_bytes: the page ends once its texts hold this many bytes.

    Returns:
        The page, and the attempt the next page starts from (None on the last page).
    """
    rows = iter(stored)
    row = next(rows, None)
    number, size = start, 0
    page: list[tasks_pb2.AttemptLog] = []
    while True:
        while row is not None and row.attempt_number < number:
            row = next(rows, None)
        if row is None and number > attempt_count:
            return page, None
        if len(page) >= page_size or size >= max_bytes:
            return page, number
        if row is not None and row.attempt_number == number:
            page.append(row.to_proto(task_id))
            size += len(row.text.encode("utf-8"))
            row = next(rows, None)
            number += 1
        elif number <= attempt_count:
            page.append(empty_log(task_id, number))
            number += 1
        else:
            assert row is not None
            number = row.attempt_number  # past the count: only stored ones are left


class AttemptLogReader:
    """Serves the two RPCs for the caller's tenant."""

    def __init__(self, *, logs: AttemptLogStore, task_of: Callable[[str], StoredTask],
                 tokens: PageTokens) -> None:
        """``task_of(task_id)``: the caller's task, or NotFound."""
        self._logs = logs
        self._task_of = task_of
        self._tokens = tokens

    def get(self, tenant_id: str, request: tasks_pb2.GetAttemptLogRequest
            ) -> tasks_pb2.AttemptLog:
        task_id, number = request.task_id, request.attempt_number
        problems = {}
        if problem := validation.problem_of(task_id, validation.TASK_ID, validation.ID_RULE):
            problems["task_id"] = problem
        if number < 1:
            problems["attempt_number"] = f"required: at least 1 (the first attempt); got {number}"
        if problems:
            raise InvalidArgument(problems)
        reading = self._logs.get_async(tenant_id, task_id, number)  # while the task is read
        stored = self._task_of(task_id)
        found = self._logs.stored_of(reading.result())
        if found is not None:
            return found.to_proto(task_id)
        count = stored.status.attempt_count
        if number <= count:
            return empty_log(task_id, number)
        raise NotFound(f"task {task_id!r} has no attempt {number}: it has had {count}",
                       reason="ATTEMPT_NOT_FOUND")

    def list(self, tenant_id: str, request: tasks_pb2.ListAttemptLogsRequest
             ) -> tasks_pb2.ListAttemptLogsResponse:
        task_id = request.task_id
        problems = {}
        if problem := validation.problem_of(task_id, validation.TASK_ID, validation.ID_RULE):
            problems["task_id"] = problem
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            problems["page_size"] = f"between 0 (the default, {PAGE_SIZE}) and {MAX_PAGE_SIZE}"
        if len(request.page_token) > validation.MAX_PAGE_TOKEN_CHARS:
            problems["page_token"] = NOT_OURS
        if problems:
            raise InvalidArgument(problems)
        start = 1
        if request.page_token:
            position = self._tokens.decode(request.page_token, listing=LISTING,
                                           tenant_id=tenant_id, filter=task_id)
            if type(position) is not int or not 1 <= position <= MAX_ATTEMPT:
                raise InvalidArgument({"page_token": NOT_OURS})
            start = position
        stored = self._task_of(task_id)
        page_size = request.page_size or PAGE_SIZE
        page, after = page_of_logs(
            task_id, self._logs.list(tenant_id, task_id, start=start, limit=page_size + 1),
            start=start, attempt_count=stored.status.attempt_count, page_size=page_size)
        response = tasks_pb2.ListAttemptLogsResponse(attempt_logs=page)
        if after is not None and after <= MAX_ATTEMPT:
            response.next_page_token = self._tokens.encode(after, listing=LISTING,
                                                           tenant_id=tenant_id, filter=task_id)
        return response
