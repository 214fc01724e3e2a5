"""Validation of public requests: every problem found at once, named by its field path."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import retry
from libs.errors import InvalidArgument

TASK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
FUNCTION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_BATCH = 1000
MAX_LABELS = 32
MAX_DELAY = timedelta(days=30)


def task_violations(request: tasks_pb2.CreateTaskRequest, *, prefix: str,
                    max_payload_bytes: int) -> dict[str, str]:
    """Problems of one CreateTaskRequest, keyed by field path under ``prefix``."""
    problems: dict[str, str] = {}
    if not request.HasField("task"):
        return {f"{prefix}task": "required"}
    task = request.task
    at = f"{prefix}task."
    if not task.function:
        problems[at + "function"] = "required"
    elif not FUNCTION_NAME.match(task.function):
        problems[at + "function"] = "must match [a-z][a-z0-9_-]{0,62}"
    if task.task_id and not TASK_ID.match(task.task_id):
        problems[at + "task_id"] = "must be 1 to 128 characters of [A-Za-z0-9_.:-]"
    if len(task.payload) > max_payload_bytes:
        problems[at + "payload"] = (f"is {len(task.payload)} bytes; the limit is "
                                    f"{max_payload_bytes} bytes")
    if task.priority not in common_pb2.Priority.values():
        problems[at + "priority"] = "unknown priority"
    if len(task.labels) > MAX_LABELS:
        problems[at + "labels"] = f"at most {MAX_LABELS} labels"
    for key, value in task.labels.items():
        if not key or len(key) > 63 or len(value) > 256:
            problems[at + f"labels[{key!r}]"] = "keys 1 to 63 characters, values at most 256"
    problems.update(_timing_violations(task, at=at))
    if task.HasField("retry_config"):
        problems.update(retry.violations(task.retry_config, at=at + "retry_config"))
    if len(request.request_id) > 128:
        problems[prefix + "request_id"] = "at most 128 characters"
    for target_index, target in enumerate(task.result_targets):
        if target.HasField("webhook") and not re.match(r"^https?://", target.webhook.url):
            problems[at + f"result_targets[{target_index}].webhook.url"] = "must be http(s)"
    return problems


def _timing_violations(task: tasks_pb2.Task, *, at: str) -> dict[str, str]:
    """schedule_time within 30 days; an expiry in the future, after the schedule."""
    problems: dict[str, str] = {}
    now = datetime.now(UTC)
    start = now
    if task.HasField("schedule_time"):
        start = max(now, task.schedule_time.ToDatetime(tzinfo=UTC))
        if start > now + MAX_DELAY:
            problems[at + "schedule_time"] = "at most 30 days ahead"
    if task.HasField("expire_time") and task.HasField("max_age"):
        problems[at + "max_age"] = "set expire_time or max_age, not both"
    elif task.HasField("max_age"):
        if not timedelta(seconds=1) <= task.max_age.ToTimedelta() <= MAX_DELAY:
            problems[at + "max_age"] = "between 1s and 30 days"
        elif now + task.max_age.ToTimedelta() <= start:
            problems[at + "max_age"] = "ends before schedule_time: the task could never start"
    elif task.HasField("expire_time") and task.expire_time.ToDatetime(tzinfo=UTC) <= start:
        problems[at + "expire_time"] = ("must be in the future and after schedule_time: "
                                        "the task could never start")
    return problems


def check_create(request: tasks_pb2.CreateTaskRequest, *, max_payload_bytes: int) -> None:
    problems = task_violations(request, prefix="", max_payload_bytes=max_payload_bytes)
    if problems:
        raise InvalidArgument(problems)


def check_batch(request: tasks_pb2.BatchCreateTasksRequest, *, max_payload_bytes: int) -> None:
    if not request.requests:
        raise InvalidArgument({"requests": "at least one request"})
    if len(request.requests) > MAX_BATCH:
        raise InvalidArgument({"requests": f"{len(request.requests)} requests; at most "
                                           f"{MAX_BATCH} per batch"})
    problems: dict[str, str] = {}
    for i, entry in enumerate(request.requests):
        problems.update(task_violations(entry, prefix=f"requests[{i}].",
                                        max_payload_bytes=max_payload_bytes))
    if problems:
        raise InvalidArgument(problems)


def function_violations(function: functions_pb2.Function) -> dict[str, str]:
    problems: dict[str, str] = {}
    if not FUNCTION_NAME.match(function.name):
        problems["function.name"] = "required; must match [a-z][a-z0-9_-]{0,62}"
    if not HANDLER.match(function.handler):
        problems["function.handler"] = "required; a Python reference 'package.module:function'"
    if function.HasField("timeout"):
        seconds = function.timeout.ToTimedelta().total_seconds()
        if not 1 <= seconds <= 24 * 3600:
            problems["function.timeout"] = "between 1s and 24h"
    if function.default_priority not in common_pb2.Priority.values():
        problems["function.default_priority"] = "unknown priority"
    if len(function.description) > 1024:
        problems["function.description"] = "at most 1,024 characters"
    if function.HasField("retry_config"):
        problems.update(retry.violations(function.retry_config, at="function.retry_config"))
    if function.HasField("dedup_window") and not (
            timedelta(minutes=1) <= function.dedup_window.ToTimedelta() <= MAX_DELAY):
        problems["function.dedup_window"] = "between 1 minute and 30 days"
    return problems
