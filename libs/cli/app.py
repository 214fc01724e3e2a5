"""The `weir` commands: each parses its options, makes one or a few SDK calls and prints."""

from __future__ import annotations

import itertools
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from google.protobuf.message import Message
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from weir.v1 import common_pb2, operations_pb2, tasks_pb2

from libs import sdk
from libs.cli import render
from libs.errors import WeirError
from libs.sdk.client import BATCH_LIMIT, FINAL, OPERATION_FINAL

DEFAULT_ADDRESS = "127.0.0.1:50051"
KEY_FILE = Path(".weir/demo-api-key")  # where `make run` writes the demo tenant's key

# Exit codes (docs/cli.md): click itself exits 2 on a usage error.
EXIT_UNSUCCESSFUL = 1  # a waited-for task or operation ended otherwise than successfully
EXIT_NO_API_KEY = 3
EXIT_RPC_BASE = 10  # + the gRPC status code: 13 INVALID_ARGUMENT, 15 NOT_FOUND, 26 UNAUTHENTICATED

M = TypeVar("M", bound=Message)


class NoApiKey(click.ClickException):
    exit_code = EXIT_NO_API_KEY

    def __init__(self) -> None:
        super().__init__(f"no API key: set WEIR_API_KEY (or --api-key), or run where "
                         f"{KEY_FILE} holds one (make run writes the demo tenant's there)")


@dataclass
class Session:
    """What every command shares (click's context object): where to call, and the consoles."""

    address: str
    api_key: str | None
    timeout: float
    out: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))

    def client(self) -> sdk.Client:
        """An SDK client, closed when the command ends; needs the API key only now, so that
        `--help` works without one."""
        key = self.api_key or (KEY_FILE.read_text().strip() if KEY_FILE.is_file() else "")
        if not key:
            raise NoApiKey()
        return click.get_current_context().with_resource(
            sdk.Client(self.address, api_key=key, timeout=self.timeout))

    def show(self, output: str, message: M, view: Callable[[M], RenderableType]) -> None:
        if output == "json":
            render.print_json(render.to_dict(message))
        else:
            self.out.print(view(message))

    def show_all(self, output: str, messages: Sequence[M],
                 view: Callable[[Sequence[M]], RenderableType]) -> None:
        """Many messages: one JSON array, or one table."""
        if output == "json":
            render.print_json([render.to_dict(m) for m in messages])
        else:
            self.out.print(view(messages))

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """Progress bars on stderr (stdout stays clean for -o json), on terminals only."""
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=self.err,
                      transient=True, disable=not self.err.is_terminal) as bar:
            yield bar


class Duration(click.ParamType):
    """``1500ms``, ``30s``, ``5m``, ``2h`` or a bare number of seconds."""

    name = "duration"
    UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|)", str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a duration like 500ms, 30s, 5m or 2h", param, ctx)
        return timedelta(seconds=float(match[1]) * self.UNITS[match[2]])


output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="table for people; json (proto JSON, field names as in the protos) for scripts.")
limit_option = click.option("--limit", type=click.IntRange(min=1), default=20,
                            show_default=True, help="Show at most this many.")

EPILOG = """\b
Exit codes:
  0       success
  1       a task or operation waited for ended otherwise than successfully,
          or some tasks of a batch were refused
  2       usage error (a bad option or argument)
  3       no API key
  10 + N  the call failed with gRPC status N (13 INVALID_ARGUMENT, 15 NOT_FOUND,
          17 PERMISSION_DENIED, 18 RESOURCE_EXHAUSTED, 24 UNAVAILABLE, 26 UNAUTHENTICATED):
          the code's name, message and details go to stderr
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100}, epilog=EPILOG)
@click.option("--address", envvar="WEIR_ADDRESS", default=DEFAULT_ADDRESS, show_default=True,
              show_envvar=True, help="The gateway, host:port.")
@click.option("--api-key", envvar="WEIR_API_KEY", show_envvar=True,
              help=f"The tenant's API key (prefer the variable: a command line is visible "
                   f"to others). Default: the contents of {KEY_FILE}.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Deadline of each call, in seconds.")
@click.pass_context
def cli(ctx: click.Context, address: str, api_key: str | None, timeout: float) -> None:
    """Weir from the command line: submit tasks and follow them, read their attempt logs,
    manage functions, dead letters and long-running operations.

    \b
    weir tasks create echo --data hello --wait
    weir tasks list --filter 'state = TASK_STATE_FAILED'
    weir tasks logs TASK_ID
    """
    ctx.obj = Session(address=address, api_key=api_key, timeout=timeout)


# --- tasks -------------------------------------------------------------------------------

@cli.group()
def tasks() -> None:
    """Submit, follow, list, cancel tasks; attempt logs.

    Submit, follow, list and cancel tasks; read what their attempts printed and logged."""


@tasks.command("create")
@click.argument("function")
@click.option("--data", help="The payload, as text.")
@click.option("--data-file", type=click.File("rb"), help="The payload from a file ('-': stdin).")
@click.option("--lines", is_flag=True,
              help="One task per line of the data (batch submission, 1,000 a call).")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Submit this many tasks of each payload (batch submission).")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]),
              help="The task's priority. Default: the function's.")
@click.option("--delay", type=Duration(), help="Run it no sooner than this from now, e.g. 30s.")
@click.option("--id", "task_id", default="",
              help="A task ID of your choosing (a repeat is ALREADY_EXISTS); one task only.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label to filter lists by; repeatable.")
@click.option("--wait", is_flag=True, help="Wait for the tasks to end, then show them.")
@click.option("--wait-timeout", type=Duration(), default="300s", show_default=True,
              help="How long --wait waits in all.")
@output_option
@click.pass_obj
def create_task(session: Session, function: str, data: str | None, data_file: IO[bytes] | None,
                lines: bool, count: int, priority: str | None, delay: timedelta | None,
                task_id: str, labels: tuple[str, ...], wait: bool, wait_timeout: timedelta,
                output: str) -> None:
    """Submit tasks of FUNCTION: one, or a batch with --lines or --count.

    \b
    weir tasks create echo --data hello --wait
    weir tasks create sleep --data 200 --count 20 --priority low
    seq 100 | weir tasks create echo --data-file - --lines
    """
    if data is not None and data_file is not None:
        raise click.UsageError("give --data or --data-file, not both")
    payload = data.encode() if data is not None else data_file.read() if data_file else b""
    payloads = payload.splitlines() if lines else [payload]
    payloads = [p for p in payloads for _ in range(count)]
    if task_id and len(payloads) != 1:
        raise click.UsageError("--id names one task: not with --lines or --count")
    if any("=" not in label for label in labels):
        raise click.UsageError("--label takes KEY=VALUE")
    fields: dict[str, Any] = {"labels": dict(label.split("=", 1) for label in labels)}
    if priority:
        fields["priority"] = common_pb2.Priority.Value(f"PRIORITY_{priority.upper()}")
    client = session.client()
    if len(payloads) == 1:
        task = client.create_task(function, payloads[0], task_id=task_id, delay=delay, **fields)
        if wait:
            [task] = wait_for(session, client, [task.task_id], wait_timeout)
        session.show(output, task, render.task_view)
        exit_unless_succeeded([task] if wait else [])
        return
    results = create_batch(session, client, function, payloads, delay, fields)
    created = [r.task.task_id for r in results if r.HasField("task")]
    if wait:
        done = wait_for(session, client, created, wait_timeout)
        session.show_all(output, done, render.tasks_table)
        exit_unless_succeeded(done)
    else:
        session.show(output, tasks_pb2.BatchCreateTasksResponse(results=results),
                     lambda response: render.batch_table(response.results))
    if len(created) < len(results):
        session.err.print(f"{len(results) - len(created)} of {len(results)} tasks refused")
        sys.exit(EXIT_UNSUCCESSFUL)


def create_batch(session: Session, client: sdk.Client, function: str, payloads: list[bytes],
                 delay: timedelta | None, fields: dict[str, Any]
                 ) -> list[tasks_pb2.BatchCreateTaskResult]:
    """BatchCreateTasks a call at a time, with a progress bar."""
    results: list[tasks_pb2.BatchCreateTaskResult] = []
    with session.progress() as bar:
        job = bar.add_task("submitting", total=len(payloads))
        for start in range(0, len(payloads), BATCH_LIMIT):
            chunk = [tasks_pb2.Task(function=function, payload=p, **fields)
                     for p in payloads[start:start + BATCH_LIMIT]]
            if delay is not None:  # now + delay, as the SDK's create_task sets it
                for task in chunk:
                    task.schedule_time.FromDatetime(datetime.now(UTC) + delay)
            results += client.create_tasks(chunk)
            bar.advance(job, len(chunk))
    return results


def wait_for(session: Session, client: sdk.Client, task_ids: Sequence[str],
             timeout: timedelta) -> list[tasks_pb2.Task]:
    """Follows each task's watch stream to its final state (a bar over the tasks, its
    description the current one's state) and returns them read back in full."""
    deadline = time.monotonic() + timeout.total_seconds()
    done = []
    with session.progress() as bar:
        job = bar.add_task("waiting", total=len(task_ids))
        for task_id in task_ids:
            for change in client.watch(task_id, timeout=max(deadline - time.monotonic(), 0.1)):
                bar.update(job, description=f"{task_id} "
                           f"{tasks_pb2.TaskState.Name(change.stage.state)}")
                if change.stage.state in FINAL:
                    break
            done.append(client.get_task(task_id))
            bar.advance(job)
    return done


def exit_unless_succeeded(tasks: Sequence[tasks_pb2.Task]) -> None:
    if any(t.state != tasks_pb2.TaskState.TASK_STATE_SUCCEEDED for t in tasks):
        sys.exit(EXIT_UNSUCCESSFUL)


@tasks.command("get")
@click.argument("task_id")
@output_option
@click.pass_obj
def get_task(session: Session, task_id: str, output: str) -> None:
    """Show a task: its state, result, timeline and attempts."""
    session.show(output, session.client().get_task(task_id), render.task_view)


@tasks.command("watch")
@click.argument("task_id")
@click.option("--wait-timeout", type=Duration(), default="300s", show_default=True,
              help="Give up (DEADLINE_EXCEEDED) after this long.")
@output_option
@click.pass_obj
def watch_task(session: Session, task_id: str, wait_timeout: timedelta, output: str) -> None:
    """Show a task's state changes as they happen, until a final one.

    With -o json, one WatchTaskResponse a line. Exits 1 unless the task SUCCEEDED.
    """
    changes = session.client().watch(task_id, timeout=wait_timeout.total_seconds())
    last = tasks_pb2.TaskState.TASK_STATE_UNSPECIFIED
    if output == "json":
        for change in changes:
            render.print_json(render.to_dict(change), compact=True)
            last = change.stage.state
            if last in FINAL:
                break
    else:
        # A table growing in place on a terminal; elsewhere printed once at the end (a
        # script that wants each change as it happens reads -o json).
        table = render.stages_table()
        with Live(table, console=session.out, auto_refresh=False,
                  transient=not session.out.is_terminal) as live:
            for change in changes:
                render.add_stage(table, change.stage)
                live.refresh()
                last = change.stage.state
                if last in FINAL:
                    break
        if not session.out.is_terminal:
            session.out.print(table)
    if last != tasks_pb2.TaskState.TASK_STATE_SUCCEEDED:
        sys.exit(EXIT_UNSUCCESSFUL)


@tasks.command("list")
@click.option("--filter", "filter_", default="", metavar="EXPR",
              help='e.g. \'function = "echo" AND state = TASK_STATE_FAILED\'; see '
                   'ListTasksRequest.filter in protos/weir/v1/tasks.proto.')
@limit_option
@output_option
@click.pass_obj
def list_tasks(session: Session, filter_: str, limit: int, output: str) -> None:
    """List tasks, newest first."""
    found = session.client().list_tasks(filter_, page_size=min(limit, BATCH_LIMIT))
    session.show_all(output, list(itertools.islice(found, limit)), render.tasks_table)


@tasks.command("cancel")
@click.argument("task_id")
@click.option("--reason", default="", help="Kept in the task's last status.")
@output_option
@click.pass_obj
def cancel_task(session: Session, task_id: str, reason: str, output: str) -> None:
    """Cancel a task that has not ended (a running attempt is stopped)."""
    session.show(output, session.client().cancel_task(task_id, reason=reason),
                 render.task_view)


@tasks.command("logs")
@click.argument("task_id")
@click.option("--attempt", type=click.IntRange(min=1),
              help="Only this attempt (1 for the first). Default: every attempt so far.")
@output_option
@click.pass_obj
def task_logs(session: Session, task_id: str, attempt: int | None, output: str) -> None:
    """Show what a task's attempts printed and logged (kept 7 days, capped)."""
    client = session.client()
    logs = [client.get_attempt_log(task_id, attempt)] if attempt \
        else list(client.list_attempt_logs(task_id))
    session.show_all(output, logs, render.attempt_logs_view)


# --- functions ---------------------------------------------------------------------------

@cli.group()
def functions() -> None:
    """Register, pause and resume functions.

    A function is a named handler with its policy (retries, rate limits, timeout)."""


@functions.command("list")
@limit_option
@output_option
@click.pass_obj
def list_functions(session: Session, limit: int, output: str) -> None:
    """List functions, by name."""
    found = session.client().list_functions(page_size=min(limit, BATCH_LIMIT))
    session.show_all(output, list(itertools.islice(found, limit)), render.functions_table)


@functions.command("get")
@click.argument("name")
@output_option
@click.pass_obj
def get_function(session: Session, name: str, output: str) -> None:
    """Show a function and its policy."""
    session.show(output, session.client().get_function(name), render.details)


@functions.command("create")
@click.argument("name")
@click.argument("handler")
@click.option("--description", default="")
@click.option("--timeout", type=Duration(), help="Longest an attempt may run (default 60s).")
@click.option("--max-attempts", type=click.IntRange(min=1), help="Retry policy: attempts in all.")
@click.option("--max-dispatches-per-second", type=click.FloatRange(min=0, min_open=True),
              help="Rate limit.")
@click.option("--max-concurrent-dispatches", type=click.IntRange(min=1),
              help="Tasks running at once.")
@click.option("--worker-concurrency", type=click.IntRange(min=1),
              help="Attempts one worker process runs at once (I/O-bound handlers).")
@output_option
@click.pass_obj
def create_function(session: Session, name: str, handler: str, description: str,
                    timeout: timedelta | None, max_attempts: int | None,
                    max_dispatches_per_second: float | None,
                    max_concurrent_dispatches: int | None, worker_concurrency: int | None,
                    output: str) -> None:
    """Register HANDLER (package.module:function, an @sdk.task) under NAME.

    \b
    weir functions create thumbnail myapp.tasks:thumbnail --max-concurrent-dispatches 4
    """
    fields: dict[str, Any] = {"description": description}
    if max_attempts:
        fields["retry_config"] = common_pb2.RetryConfig(max_attempts=max_attempts)
    if max_dispatches_per_second or max_concurrent_dispatches:
        fields["rate_limits"] = common_pb2.RateLimits(
            max_dispatches_per_second=max_dispatches_per_second or 0,
            max_concurrent_dispatches=max_concurrent_dispatches or 0)
    if worker_concurrency:
        fields["worker_concurrency"] = worker_concurrency
    function = session.client().create_function(name, handler, timeout=timeout, **fields)
    session.show(output, function, render.details)


@functions.command("pause")
@click.argument("name")
@output_option
@click.pass_obj
def pause_function(session: Session, name: str, output: str) -> None:
    """Hold a function's tasks in their queues until it is resumed."""
    session.show(output, session.client().pause_function(name), render.details)


@functions.command("resume")
@click.argument("name")
@output_option
@click.pass_obj
def resume_function(session: Session, name: str, output: str) -> None:
    """Dispatch a paused function's tasks again."""
    session.show(output, session.client().resume_function(name), render.details)


@functions.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Cancel its unfinished tasks first.")
@click.option("--wait", is_flag=True, help="Wait for the operation to end.")
@output_option
@click.pass_obj
def delete_function(session: Session, name: str, force: bool, wait: bool, output: str) -> None:
    """Delete a function (a long-running operation)."""
    client = session.client()
    finish_operation(session, client, client.delete_function(name, force=force), wait, output)


# --- dead letters ------------------------------------------------------------------------

@cli.group("dead-letters")
def dead_letters() -> None:
    """Failed tasks: inspect and re-drive them.

    Tasks that failed for good are kept with their payload and attempts, to re-drive later
    (optionally with a corrected payload)."""


@dead_letters.command("list")
@click.option("--filter", "filter_", default="", metavar="EXPR",
              help='e.g. \'function = "resize"\'; see ListDeadLettersRequest.filter.')
@limit_option
@output_option
@click.pass_obj
def list_dead_letters(session: Session, filter_: str, limit: int, output: str) -> None:
    """List dead letters."""
    found = session.client().list_dead_letters(filter_, page_size=min(limit, BATCH_LIMIT))
    session.show_all(output, list(itertools.islice(found, limit)), render.dead_letters_table)


@dead_letters.command("get")
@click.argument("task_id")
@output_option
@click.pass_obj
def get_dead_letter(session: Session, task_id: str, output: str) -> None:
    """Show a dead letter: its payload, last status and attempts."""
    session.show(output, session.client().get_dead_letter(task_id), render.details)


@dead_letters.command("redrive")
@click.argument("task_ids", nargs=-1)
@click.option("--filter", "filter_", default="", metavar="EXPR",
              help="Re-drive those matching this instead of (or besides) the IDs.")
@click.option("--data", help="A corrected payload, as text, for every re-driven task.")
@click.option("--per-second", type=click.FloatRange(min=0), default=0,
              help="At most this many re-drives a second (0: no limit).")
@click.option("--wait", is_flag=True, help="Wait for the operation to end.")
@output_option
@click.pass_obj
def redrive(session: Session, task_ids: tuple[str, ...], filter_: str, data: str | None,
            per_second: float, wait: bool, output: str) -> None:
    """Re-drive dead letters as new attempts of the same tasks (a long-running operation)."""
    if not task_ids and not filter_:
        raise click.UsageError("name the dead letters: TASK_ID... or --filter")
    client = session.client()
    operation = client.redrive_dead_letters(
        task_ids, filter=filter_, per_second=per_second,
        payload_override=None if data is None else data.encode())
    finish_operation(session, client, operation, wait, output)


# --- operations --------------------------------------------------------------------------

@cli.group()
def operations() -> None:
    """Follow long-running operations.

    Batch cancels and deletes, dead-letter re-drives and function deletions run as
    long-running operations."""


@operations.command("list")
@limit_option
@output_option
@click.pass_obj
def list_operations(session: Session, limit: int, output: str) -> None:
    """List operations, newest first."""
    found = session.client().list_operations(page_size=min(limit, BATCH_LIMIT))
    session.show_all(output, list(itertools.islice(found, limit)), render.operations_table)


@operations.command("get")
@click.argument("name")
@output_option
@click.pass_obj
def get_operation(session: Session, name: str, output: str) -> None:
    """Show an operation and its progress."""
    session.show(output, session.client().get_operation(name), render.details)


@operations.command("wait")
@click.argument("name")
@click.option("--wait-timeout", type=Duration(), default="300s", show_default=True,
              help="Stop waiting (and show it as it is) after this long.")
@output_option
@click.pass_obj
def wait_operation(session: Session, name: str, wait_timeout: timedelta, output: str) -> None:
    """Wait for an operation to end, with a progress bar. Exits 1 unless it SUCCEEDED."""
    client = session.client()
    finish_operation(session, client, client.get_operation(name), True, output, wait_timeout)


def finish_operation(session: Session, client: sdk.Client, operation: operations_pb2.Operation,
                     wait: bool, output: str,
                     timeout: timedelta = timedelta(minutes=5)) -> None:
    """Shows an operation, first (with ``wait``) polling it to its end with a progress bar
    of the items processed; exits 1 when a waited-for one did not succeed."""
    if wait:
        deadline = time.monotonic() + timeout.total_seconds()
        with session.progress() as bar:
            job = bar.add_task(operation.name, total=None)
            while operation.state not in OPERATION_FINAL and time.monotonic() < deadline:
                # Short waits (WaitOperation) so the bar moves at least once a second.
                operation = client.wait_operation(
                    operation.name, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                bar.update(job, total=operation.matched_count or None,
                           completed=operation.processed_count)
    session.show(output, operation, render.details)
    if wait and operation.state != operations_pb2.OperationState.OPERATION_STATE_SUCCEEDED:
        sys.exit(EXIT_UNSUCCESSFUL)


def main() -> None:
    """The console script: runs a command; a failed call prints its status and exits 10 + code."""
    try:
        cli.main(prog_name="weir")
    except WeirError as err:
        render.error(Console(stderr=True), err)
        sys.exit(EXIT_RPC_BASE + err.code.value[0])
