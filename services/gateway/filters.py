"""The ListTasks filter: comparisons joined by AND, e.g.
``function = "resize" AND state = TASK_STATE_FAILED AND create_time >= "2026-11-24T00:00:00Z"``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from weir.v1 import tasks_pb2

from libs.errors import InvalidArgument

CLAUSE = re.compile(
    r'^\s*(?P<field>function|state|create_time|labels\.[A-Za-z0-9_.-]+)\s*'
    r'(?P<op>>=|<=|!=|=|>|<)\s*(?P<value>"[^"]*"|[A-Za-z0-9_:.+-]+)\s*$')
OPS: dict[str, Callable] = {"=": operator.eq, "!=": operator.ne, ">": operator.gt,
                            ">=": operator.ge, "<": operator.lt, "<=": operator.le}
EQUALITY = {"=", "!="}


@dataclass
class TaskFilter:
    """A parsed filter; `matches` tells whether a task passes every clause."""

    checks: list[Callable[[tasks_pb2.Task], bool]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> TaskFilter:
        checks = []
        for clause in (re.split(r"\s+AND\s+", text.strip()) if text.strip() else []):
            match = CLAUSE.match(clause)
            if not match:
                raise InvalidArgument({"filter": f"cannot read {clause.strip()!r}: expected "
                                                 "<field> <op> <value> joined by AND"})
            checks.append(cls._check(match["field"], match["op"], match["value"].strip('"')))
        return cls(checks)

    def matches(self, task: tasks_pb2.Task) -> bool:
        return all(check(task) for check in self.checks)

    @staticmethod
    def _check(name: str, op: str, value: str) -> Callable[[tasks_pb2.Task], bool]:
        compare = OPS[op]
        if name == "create_time":
            try:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidArgument({"filter": f"create_time wants an RFC 3339 time, "
                                                 f"not {value!r}"}) from exc
            return lambda t: compare(t.create_time.ToDatetime().replace(
                tzinfo=when.tzinfo), when)
        if op not in EQUALITY:
            raise InvalidArgument({"filter": f"{name} supports only = and !="})
        if name == "state":
            if value not in tasks_pb2.TaskState.DESCRIPTOR.values_by_name:
                raise InvalidArgument({"filter": f"unknown state {value!r}"})
            number = tasks_pb2.TaskState.Value(value)
            return lambda t: compare(t.state, number)
        if name == "function":
            return lambda t: compare(t.function, value)
        key = name.removeprefix("labels.")
        return lambda t: compare(t.labels.get(key, ""), value)
