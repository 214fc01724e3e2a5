"""List filters: comparisons joined by AND, e.g.
``function = "resize" AND state = TASK_STATE_FAILED AND create_time >= "2026-11-24T00:00:00Z"``.

One grammar for every listing; each listing declares its fields and how to read them.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from weir.v1 import common_pb2, tasks_pb2

from libs.errors import InvalidArgument

CLAUSE = re.compile(
    r'^\s*(?P<field>[a-z_]+(?:\.[A-Za-z0-9_.-]+)?)\s*'
    r'(?P<op>>=|<=|!=|=|>|<)\s*(?P<value>"[^"]*"|[A-Za-z0-9_:.+-]+)\s*$')
OPS: dict[str, Callable] = {"=": operator.eq, "!=": operator.ne, ">": operator.gt,
                            ">=": operator.ge, "<": operator.lt, "<=": operator.le}
EQUALITY = {"=", "!="}

TIME = "time"
TEXT = "text"


@dataclass
class Filter:
    """A parsed filter; `matches` tells whether an item passes every clause.

    Subclasses declare FIELDS: name -> (kind, getter), where kind is TIME, TEXT or an enum
    wrapper; a name ending in ``.`` takes a key (``labels.customer``).
    """

    FIELDS: ClassVar[dict[str, tuple[Any, Callable[[Any, str], Any]]]] = {}
    checks: list[Callable[[Any], bool]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Filter:
        checks = []
        for clause in (re.split(r"\s+AND\s+", text.strip()) if text.strip() else []):
            match = CLAUSE.match(clause)
            if not match:
                raise InvalidArgument({"filter": f"cannot read {clause.strip()!r}: expected "
                                                 "<field> <op> <value> joined by AND"})
            checks.append(cls._check(match["field"], match["op"], match["value"].strip('"')))
        return cls(checks)

    def matches(self, item: Any) -> bool:
        return all(check(item) for check in self.checks)

    @classmethod
    def _check(cls, name: str, op: str, value: str) -> Callable[[Any], bool]:
        base, dot, key = name.partition(".")
        spec = cls.FIELDS.get(base + dot)
        if spec is None:
            raise InvalidArgument({"filter": f"unknown field {name!r}; known: "
                                             f"{', '.join(sorted(cls.FIELDS))}"})
        kind, get = spec
        compare = OPS[op]
        if kind == TIME:
            try:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidArgument({"filter": f"{name} wants an RFC 3339 time, "
                                                 f"not {value!r}"}) from exc
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            return lambda item: compare(get(item, key), when)
        if op not in EQUALITY:
            raise InvalidArgument({"filter": f"{name} supports only = and !="})
        if isinstance(kind, EnumTypeWrapper):
            if value not in kind.DESCRIPTOR.values_by_name:
                raise InvalidArgument({"filter": f"unknown {name} {value!r}"})
            number = kind.Value(value)
            return lambda item: compare(get(item, key), number)
        return lambda item: compare(get(item, key), value)


def _time(timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


class TaskFilter(Filter):
    """The ListTasks (and batch operations') filter over weir.v1.Task."""

    FIELDS = {
        "function": (TEXT, lambda t, _: t.function),
        "state": (tasks_pb2.TaskState, lambda t, _: t.state),
        "create_time": (TIME, lambda t, _: _time(t.create_time)),
        "labels.": (TEXT, lambda t, key: t.labels.get(key, "")),
    }


class DeadLetterFilter(Filter):
    """The ListDeadLetters filter, over the listing rows (`DeadLetterRow`: no dead letter
    read needed)."""

    FIELDS = {
        "function": (TEXT, lambda r, _: r.function),
        "error_class": (common_pb2.ErrorClass, lambda r, _: r.error_class),
        "dead_letter_time": (TIME, lambda r, _: r.dead_letter_time),
    }
