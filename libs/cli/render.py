"""What `weir` prints: rich tables for people, proto JSON for scripts, errors on stderr."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence

import click
import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text
from weir.v1 import dead_letters_pb2, functions_pb2, operations_pb2, tasks_pb2

from libs.errors import InvalidArgument, ResourceExhausted, WeirError

State = tasks_pb2.TaskState
STATE_STYLES: dict[int, str] = {State.TASK_STATE_SUCCEEDED: "green", State.TASK_STATE_FAILED: "red",
                State.TASK_STATE_CANCELLED: "yellow", State.TASK_STATE_EXPIRED: "yellow",
                State.TASK_STATE_RUNNING: "cyan", State.TASK_STATE_RETRY_WAIT: "magenta"}
# Shown in their own tables under a task, not among its fields.
TASK_TABLES = {"stages", "attempts"}


def to_dict(message: Message) -> dict[str, object]:
    """Proto JSON with the proto's own field names, as grpcurl prints it."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: object, *, compact: bool = False) -> None:
    click.echo(json.dumps(value, indent=None if compact else 2))


def text_of(data: bytes) -> Text:
    """Payloads and results are bytes: shown as text when they are UTF-8, else base64."""
    try:
        return Text(data.decode())
    except UnicodeDecodeError:
        return Text(f"base64:{base64.b64encode(data).decode()}", style="dim")


def task_state(state: int) -> Text:
    """``TASK_STATE_SUCCEEDED`` -> ``SUCCEEDED`` for tables (JSON keeps the full names)."""
    return Text(State.Name(state).removeprefix("TASK_STATE_"),
                style=STATE_STYLES.get(state, ""))


def time_of(stamp: timestamp_pb2.Timestamp) -> str:
    """UTC to the millisecond; empty when unset."""
    if not (stamp.seconds or stamp.nanos):
        return ""
    return stamp.ToDatetime().isoformat(timespec="milliseconds") + "Z"


def table(*headers: str, title: str = "") -> Table:
    """A table whose first column (an ID) is never cut and whose others fold, not elide."""
    table = Table(title=title or None, title_justify="left")
    table.add_column(headers[0], no_wrap=True)
    for header in headers[1:]:
        table.add_column(header, overflow="fold")
    return table


def details(message: Message, *, skip: Iterable[str] = ()) -> Table:
    """Every set field of a message, one a row: bytes as text, the rest as in proto JSON."""
    as_json = to_dict(message)
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field, value in message.ListFields():
        if field.name in skip:
            continue
        if isinstance(value, bytes):
            table.add_row(field.name, text_of(value))
        elif (shown := as_json[field.name]) not in ({}, []):  # e.g. an OK last_status
            table.add_row(field.name, Text(shown if isinstance(shown, str)
                                           else json.dumps(shown)))
    return table


def task_view(task: tasks_pb2.Task) -> RenderableType:
    """A task: its fields, then its timeline and attempts when the view has them."""
    parts: list[RenderableType] = [details(task, skip=TASK_TABLES)]
    if task.stages:
        stages = table("time", "state", "service", "attempt", "detail", title="timeline")
        for stage in task.stages:
            stages.add_row(time_of(stage.time), task_state(stage.state), stage.service,
                           str(stage.attempt_number or ""), Text(stage.detail))
        parts.append(stages)
    if task.attempts:
        attempts = table("attempt", "dispatched", "started", "ended", "status", "executor",
                         title="attempts")
        for attempt in task.attempts:
            attempts.add_row(str(attempt.attempt_number), time_of(attempt.dispatch_time),
                             time_of(attempt.start_time), time_of(attempt.end_time),
                             Text(attempt.status.message or ("OK" if attempt.end_time.seconds
                                                             else "")),
                             attempt.executor_id)
        parts.append(attempts)
    return Group(*parts)


def tasks_table(tasks: Sequence[tasks_pb2.Task]) -> Table:
    shown = table("task_id", "function", "state", "attempts", "created", "updated")
    for task in tasks:
        shown.add_row(task.task_id, task.function, task_state(task.state),
                      str(task.attempt_count), time_of(task.create_time),
                      time_of(task.update_time))
    return shown


def batch_table(results: Sequence[tasks_pb2.BatchCreateTaskResult]) -> Table:
    shown = table("task_id", "state", "error")
    for result in results:
        if result.HasField("task"):
            shown.add_row(result.task.task_id, task_state(result.task.state), "")
        else:
            shown.add_row("", "", Text(f"{code_name(result.status.code)}: "
                                       f"{result.status.message}", style="red"))
    return shown


def stages_table() -> Table:
    """The (growing) table of a watch: one row per state change."""
    return table("time", "state", "service", "attempt", "detail")


def add_stage(table: Table, stage: tasks_pb2.TaskStage) -> None:
    table.add_row(time_of(stage.time), task_state(stage.state), stage.service,
                  str(stage.attempt_number or ""), Text(stage.detail))


def attempt_logs_view(logs: Sequence[tasks_pb2.AttemptLog]) -> RenderableType:
    parts: list[RenderableType] = []
    for log in logs:
        note = f", truncated from {log.original_bytes} bytes" if log.truncated else ""
        parts += [Rule(f"attempt {log.attempt_number}{note}", align="left"), Text(log.text)]
    return Group(*parts)


def dead_letters_table(letters: Sequence[dead_letters_pb2.DeadLetter]) -> Table:
    shown = table("task_id", "function", "dead since", "redrives", "last status")
    for letter in letters:
        shown.add_row(letter.task_id, letter.function, time_of(letter.dead_letter_time),
                      str(letter.redrive_count), Text(letter.last_status.message))
    return shown


def operations_table(operations: Sequence[operations_pb2.Operation]) -> Table:
    shown = table("name", "state", "description", "processed", "failed", "created")
    for op in operations:
        state = operations_pb2.OperationState.Name(op.state).removeprefix("OPERATION_STATE_")
        shown.add_row(op.name, state, Text(op.description),
                      f"{op.processed_count}/{op.matched_count}", str(op.failed_count),
                      time_of(op.create_time))
    return shown


def functions_table(functions: Sequence[functions_pb2.Function]) -> Table:
    shown = table("name", "state", "handler", "created")
    for function in functions:
        state = functions_pb2.FunctionState.Name(function.state).removeprefix(
            "FUNCTION_STATE_")
        shown.add_row(function.name, state, Text(function.handler),
                      time_of(function.create_time))
    return shown


def code_name(code: int) -> str:
    """google.rpc.Code number -> its name, e.g. 5 -> NOT_FOUND."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def error(console: Console, err: WeirError) -> None:
    """The status a call failed with and its decoded details (libs.errors), for stderr."""
    console.print(Text.assemble(("error: ", "bold red"), (err.code.name, "bold"), ": ",
                                err.message))
    lines: list[tuple[str, str]] = []
    if isinstance(err, InvalidArgument):
        lines += [("field " + field, description)
                  for field, description in err.violations.items()]
    if err.reason:
        lines.append(("reason", err.reason))
        lines += [(f"  {key}", value) for key, value in sorted(err.metadata.items())]
    if isinstance(err, ResourceExhausted):
        lines.append(("retry after", f"{err.retry_after.total_seconds():g}s"))
        if err.subject:
            lines.append(("over the limit", err.subject))
    grid = Table.grid(padding=(0, 2))
    for key, value in lines:
        grid.add_row(Text(key), Text(value))
    if lines:
        console.print(Padding.indent(grid, 2))
