"""Validation of public requests: every problem found at once, named by its field path.

Every identifier, name and label has a cap, every pattern must match the whole value (a
`$` would let a trailing newline through), every timestamp and duration is checked against
protobuf's range before it is converted, and every enum against its known values: whatever
a caller sends is INVALID_ARGUMENT naming the field, never an error of ours. Messages quote
what they echo through `excerpt`, so an error stays small whatever the input.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import retry, webhooks
from libs.errors import InvalidArgument, excerpt
from libs.ratelimits import rate_limit_violations
from libs.sdk.handlers import handler_problem

# The caps, also documented on the fields in protos/weir/v1.
TASK_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces
FUNCTION_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_KEY = re.compile(r"[A-Za-z0-9_.-]{1,63}")
OPERATION_NAME = re.compile(r"op-[0-9a-f]{32}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_HANDLER_CHARS = 256
MAX_LABEL_VALUE_CHARS = 256
MAX_LABELS = 32
MAX_REASON_CHARS = 256
MAX_DESCRIPTION_CHARS = 1024
MAX_PAGE_TOKEN_CHARS = 2048
MAX_PAGE_SIZE = 1000
MAX_BATCH = 1000
MAX_DELAY = timedelta(days=30)
MAX_WORKER_CONCURRENCY = 64  # attempts in one worker process, each in a thread

# google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799
MAX_DURATION_SECONDS = 315_576_000_000  # about 10,000 years, protobuf's documented bound

ID_RULE = "1 to 128 characters of [A-Za-z0-9_.:-]"
UNLIMITED_RULE = "required with max_attempts -1 (unlimited): retries need an end"
REQUEST_ID_RULE = "1 to 128 printable ASCII characters without spaces"
NAME_RULE = "1 to 63 characters of [a-z0-9_-], starting with a letter"


def problem_of(value: str, pattern: re.Pattern[str], rule: str) -> str | None:
    """``rule`` (with an excerpt of the value) unless the whole value matches ``pattern``."""
    if pattern.fullmatch(value):
        return None
    return f"must be {rule}; got {excerpt(value)}" if value else f"required; {rule}"


def check_id(value: str, field: str = "task_id", *, pattern: re.Pattern[str] = TASK_ID,
             rule: str = ID_RULE) -> None:
    """Raises INVALID_ARGUMENT naming ``field`` unless ``value`` is a well-formed ID."""
    problem = problem_of(value, pattern, rule)
    if problem:
        raise InvalidArgument({field: problem})


def check_name(value: str, field: str = "name") -> None:
    check_id(value, field, pattern=FUNCTION_NAME, rule=NAME_RULE)


def check_operation_name(value: str, field: str = "name") -> None:
    check_id(value, field, pattern=OPERATION_NAME, rule="an operation name, op-<32 hex>")


def timestamp_problem(value: timestamp_pb2.Timestamp) -> str | None:
    if not MIN_SECONDS <= value.seconds <= MAX_SECONDS or not 0 <= value.nanos < 1_000_000_000:
        return "not a valid timestamp (years 1 to 9999, nanos 0 to 999,999,999)"
    return None


def duration_problem(value: duration_pb2.Duration) -> str | None:
    seconds, nanos = value.seconds, value.nanos
    if (abs(seconds) > MAX_DURATION_SECONDS or abs(nanos) >= 1_000_000_000
            or (seconds > 0 > nanos) or (seconds < 0 < nanos)):
        return "not a valid duration"
    return None


def enum_problem(value: int, enum: EnumTypeWrapper) -> str | None:
    if value in enum.values():
        return None
    return f"unknown value {value}; one of {', '.join(enum.keys())}"


def check_enum(value: int, enum: EnumTypeWrapper, field: str) -> None:
    problem = enum_problem(value, enum)
    if problem:
        raise InvalidArgument({field: problem})


def check_page(page_size: int, page_token: str) -> None:
    """The paging fields every listing shares."""
    problems = {}
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        problems["page_size"] = f"between 0 (the default, 100) and {MAX_PAGE_SIZE:,}"
    if len(page_token) > MAX_PAGE_TOKEN_CHARS:
        problems["page_token"] = "not a token this API returned"
    if problems:
        raise InvalidArgument(problems)


def text_problem(value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"at most {limit:,} characters (got {len(value):,})"
    if CONTROL.search(value):
        return "no control characters"
    return None


# --- tasks ---------------------------------------------------------------------------------

def task_violations(request: tasks_pb2.CreateTaskRequest, *, prefix: str,
                    max_payload_bytes: int, allow_private_targets: bool,
                    resolve_until: float | None = None) -> dict[str, str]:
    """Problems of one CreateTaskRequest, keyed by field path under ``prefix``."""
    problems: dict[str, str] = {}
    if not request.HasField("task"):
        return {f"{prefix}task": "required"}
    task = request.task
    at = f"{prefix}task."
    checks = {
        "function": problem_of(task.function, FUNCTION_NAME, NAME_RULE),
        "task_id": problem_of(task.task_id, TASK_ID, ID_RULE) if task.task_id else None,
        "priority": enum_problem(task.priority, common_pb2.Priority),
    }
    problems.update({at + f: p for f, p in checks.items() if p})
    if len(task.payload) > max_payload_bytes:
        problems[at + "payload"] = (f"is {len(task.payload)} bytes; the limit is "
                                    f"{max_payload_bytes} bytes")
    problems.update(_label_violations(task.labels, at=at + "labels"))
    problems.update(_timing_violations(task, at=at))
    if task.HasField("retry_config"):
        problems.update(retry_violations(task.retry_config, at=at + "retry_config"))
    if request.request_id:
        problem = problem_of(request.request_id, REQUEST_ID, REQUEST_ID_RULE)
        if problem:
            problems[prefix + "request_id"] = problem
    problems.update(webhooks.target_violations(
        task.result_targets, at=at + "result_targets", allow_private=allow_private_targets,
        resolve_until=resolve_until))
    return problems


def _label_violations(labels: Mapping[str, str], *, at: str) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        return {at: f"at most {MAX_LABELS} labels (got {len(labels)})"}
    for key, value in sorted(labels.items()):
        problem = (problem_of(key, LABEL_KEY, "1 to 63 characters of [A-Za-z0-9_.-]")
                   or text_problem(value, MAX_LABEL_VALUE_CHARS))
        if problem:  # the first bad label only: keys are the caller's, errors stay small
            return {f"{at}[{excerpt(key, 70)}]": problem}
    return {}


def _timing_violations(task: tasks_pb2.Task, *, at: str) -> dict[str, str]:
    """Valid values; schedule_time within 30 days; an expiry in the future, after the
    schedule."""
    problems: dict[str, str] = {}
    for name in ("schedule_time", "expire_time"):
        if task.HasField(name) and (problem := timestamp_problem(getattr(task, name))):
            problems[at + name] = problem
    if task.HasField("max_age") and (problem := duration_problem(task.max_age)):
        problems[at + "max_age"] = problem
    if problems:
        return problems
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


def retry_violations(config: common_pb2.RetryConfig, *, at: str) -> dict[str, str]:
    """A RetryConfig's durations are valid first; then its bounds (`libs.retry`)."""
    invalid = {f"{at}.{f.name}": problem for f, value in config.ListFields()
               if isinstance(value, duration_pb2.Duration)
               and (problem := duration_problem(value))}
    return invalid or retry.violations(config, at=at)


def check_create(request: tasks_pb2.CreateTaskRequest, *, max_payload_bytes: int,
                 allow_private_targets: bool) -> None:
    problems = task_violations(request, prefix="", max_payload_bytes=max_payload_bytes,
                               allow_private_targets=allow_private_targets)
    if problems:
        raise InvalidArgument(problems)


def check_batch(request: tasks_pb2.BatchCreateTasksRequest, *, max_payload_bytes: int,
                allow_private_targets: bool) -> None:
    if not request.requests:
        raise InvalidArgument({"requests": "at least one request"})
    if len(request.requests) > MAX_BATCH:
        raise InvalidArgument({"requests": f"{len(request.requests)} requests; at most "
                                           f"{MAX_BATCH} per batch"})
    resolve_until = time.monotonic() + webhooks.LOOKUP_SECONDS  # one budget for the batch
    problems: dict[str, str] = {}
    for i, entry in enumerate(request.requests):
        problems.update(task_violations(entry, prefix=f"requests[{i}].",
                                        max_payload_bytes=max_payload_bytes,
                                        allow_private_targets=allow_private_targets,
                                        resolve_until=resolve_until))
        if len(problems) > 50:  # enough to fix the batch; a longer list only grows the error
            break
    if problems:
        raise InvalidArgument(problems)


def check_view(view: int) -> None:
    check_enum(view, tasks_pb2.TaskView, "view")


def check_reason(reason: str) -> None:
    problem = text_problem(reason, MAX_REASON_CHARS)
    if problem:
        raise InvalidArgument({"reason": problem})


def check_request_id(request_id: str, field: str = "request_id") -> None:
    if request_id:
        check_id(request_id, field, pattern=REQUEST_ID, rule=REQUEST_ID_RULE)


def check_task_ids(task_ids: Sequence[str], field: str = "task_ids") -> None:
    for i, task_id in enumerate(task_ids):
        check_id(task_id, f"{field}[{i}]")


# --- functions -----------------------------------------------------------------------------

def function_violations(function: functions_pb2.Function, *, handler_packages: Sequence[str],
                        allow_private_targets: bool) -> dict[str, str]:
    """Problems of a function as it would be stored (CreateFunction, UpdateFunction)."""
    problems: dict[str, str] = {}
    if problem := problem_of(function.name, FUNCTION_NAME, NAME_RULE):
        problems["function.name"] = problem
    if not function.handler:
        problems["function.handler"] = "required; 'package.module:function' of an @sdk.task"
    elif len(function.handler) > MAX_HANDLER_CHARS:
        problems["function.handler"] = f"at most {MAX_HANDLER_CHARS} characters"
    elif problem := handler_problem(function.handler, handler_packages):
        problems["function.handler"] = problem
    if function.HasField("timeout"):
        problem = duration_problem(function.timeout)
        if problem is None and not 1 <= function.timeout.ToTimedelta().total_seconds() <= 86400:
            problem = "between 1s and 24h"
        if problem:
            problems["function.timeout"] = problem
    if problem := enum_problem(function.default_priority, common_pb2.Priority):
        problems["function.default_priority"] = problem
    if problem := text_problem(function.description, MAX_DESCRIPTION_CHARS):
        problems["function.description"] = problem
    if function.HasField("retry_config"):
        retry_problems = retry_violations(function.retry_config, at="function.retry_config")
        if not retry_problems and unlimited_without_end([function.retry_config]):
            retry_problems["function.retry_config.max_retry_duration"] = UNLIMITED_RULE
        problems.update(retry_problems)
    problems.update(rate_limit_violations(function.rate_limits, at="function.rate_limits"))
    if not 0 <= function.worker_concurrency <= MAX_WORKER_CONCURRENCY:
        problems["function.worker_concurrency"] = (
            f"between 0 (the default, 1) and {MAX_WORKER_CONCURRENCY}")
    if function.HasField("dedup_window"):
        problem = duration_problem(function.dedup_window)
        if problem is None and not (
                timedelta(minutes=1) <= function.dedup_window.ToTimedelta() <= MAX_DELAY):
            problem = "between 1 minute and 30 days"
        if problem:
            problems["function.dedup_window"] = problem
    problems.update(webhooks.target_violations(
        function.result_targets, at="function.result_targets",
        allow_private=allow_private_targets))
    return problems


def unlimited_without_end(configs: Iterable[common_pb2.RetryConfig]) -> bool:
    """Whether function and task policies together retry forever: -1 attempts and no
    max_retry_duration (the task's fields override the function's)."""
    policy = retry.RetryPolicy.of(*configs)
    return policy.max_attempts == -1 and not policy.max_retry_duration
