"""List filters: comparisons joined by AND, e.g.
``function = "resize" AND state = TASK_STATE_FAILED AND create_time >= "2026-11-24T00:00:00Z"``.

One grammar for every listing; each listing declares its fields and how to read them::

    filter   = [ clause { "AND" clause } ]
    clause   = field operator value
    field    = name [ "." key ]      name a declared field, key [A-Za-z0-9_.-]+
    operator = "=" | "!=" | "<" | "<=" | ">" | ">="
    value    = quoted | word
    quoted   = '"' { any character but " and \\ | '\\"' | '\\\\' } '"'
    word     = [A-Za-z0-9_:.+-]+

Whitespace separates tokens; AND is case-sensitive. A filter is read in one pass: a tokenizer
moves a single position forward, then a loop parser takes clause (AND clause)*. Filters come
from any caller, so the cost must stay linear in their length (at most MAX_FILTER_CHARS).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.timestamp_pb2 import Timestamp
from weir.v1 import common_pb2, tasks_pb2

from libs.errors import InvalidArgument, excerpt

MAX_FILTER_CHARS = 4096

# Each pattern is matched at the tokenizer's position and is one repeated character class (or a
# fixed operator), so it stops at the first character outside its class and never backtracks.
WHITESPACE = re.compile(r"\s+")
WORD = re.compile(r"[A-Za-z0-9_:.+-]+")
OPERATOR = re.compile(r"[<>!]=|[=<>]")
PLAIN = re.compile(r'[^"\\]+')  # inside quotes, the run up to the next quote or backslash
KEY = re.compile(r"[A-Za-z0-9_.-]+")  # checked whole on the key of a word already read

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, ">": operator.gt,
    ">=": operator.ge, "<": operator.lt, "<=": operator.le}
EQUALITY = {"=", "!="}

TIME = "time"
TEXT = "text"

# Token kinds.
WORD_TOKEN = "word"
QUOTED_TOKEN = "quoted"
OPERATOR_TOKEN = "operator"
END_TOKEN = "end"


@dataclass(frozen=True, slots=True)
class Token:
    """A piece of the filter: ``text`` is its value (quotes and escapes removed), ``raw`` the
    characters it was read from, ``at`` the offset of its first character."""

    kind: str
    text: str
    raw: str
    at: int


@dataclass
class Filter:
    """A parsed filter; `matches` tells whether an item passes every clause.

    Subclasses declare FIELDS: name -> (kind, getter), where kind is TIME, TEXT or an enum
    wrapper; a name ending in ``.`` takes a key (``labels.customer``).
    """

    FIELDS: ClassVar[dict[str, tuple[Any, Callable[[Any, str], Any]]]] = {}
    checks: list[Callable[[Any], bool]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Reads a filter in time linear in its length.

        Args:
            text: The caller's filter; empty or blank matches everything.

        Returns:
            The filter, one check per clause.

        Raises:
            InvalidArgument: On field ``filter``, saying at which character offset the text
                leaves the grammar or names a field or value this listing does not know; or
                when it is longer than MAX_FILTER_CHARS.
        """
        if len(text) > MAX_FILTER_CHARS:
            raise InvalidArgument({"filter": f"at most {MAX_FILTER_CHARS} characters, "
                                             f"not {len(text)}"})
        tokens = _tokens(text)
        checks: list[Callable[[Any], bool]] = []
        token = next(tokens)
        if token.kind == END_TOKEN:
            return cls(checks)
        while True:
            if token.kind != WORD_TOKEN or token.text == "AND":
                raise _invalid(token.at, f"expected a field name, found {_found(token)}")
            op = next(tokens)
            if op.kind != OPERATOR_TOKEN:
                raise _invalid(op.at, f"expected an operator (= != < <= > >=), "
                                      f"found {_found(op)}")
            value = next(tokens)
            if value.kind not in (WORD_TOKEN, QUOTED_TOKEN):
                raise _invalid(value.at, f"expected a value, found {_found(value)}")
            checks.append(cls._check(token, op, value))
            token = next(tokens)
            if token.kind == END_TOKEN:
                return cls(checks)
            if token.kind != WORD_TOKEN or token.text != "AND":
                raise _invalid(token.at, f"expected AND or the end, found {_found(token)}")
            token = next(tokens)

    def matches(self, item: Any) -> bool:
        """Whether ``item`` passes every clause."""
        return all(check(item) for check in self.checks)

    @classmethod
    def _check(cls, name: Token, op: Token, value: Token) -> Callable[[Any], bool]:
        """One clause as a predicate over items; InvalidArgument where it does not fit."""
        base, dot, key = name.text.partition(".")
        spec = cls.FIELDS.get(base + dot)
        if spec is None:
            known = ", ".join(sorted(f + "<key>" if f.endswith(".") else f for f in cls.FIELDS))
            raise _invalid(name.at, f"unknown field {excerpt(name.text)}; known: {known}")
        if dot and not KEY.fullmatch(key):
            raise _invalid(name.at + len(base) + 1, f"a {base} key is 1 or more of "
                                                   f"A-Z a-z 0-9 _ . -, not {excerpt(key)}")
        shown = base + (".<key>" if dot else "")  # bounded, unlike the caller's key
        kind, get = spec
        compare = OPS[op.text]
        if kind == TIME:
            when = _when(value, shown)
            return lambda item: compare(_utc(get(item, key)), when)
        if op.text not in EQUALITY:
            raise _invalid(op.at, f"{shown} supports only = and !=")
        if isinstance(kind, EnumTypeWrapper):
            if value.text not in kind.DESCRIPTOR.values_by_name:
                raise _invalid(value.at, f"unknown {shown} {excerpt(value.text)}")
            number = kind.Value(value.text)
            return lambda item: compare(get(item, key), number)
        return lambda item: compare(get(item, key), value.text)


def _tokens(text: str) -> Iterator[Token]:
    """The tokens of ``text`` in order, then an END token.

    A single position only moves forward, so the walk is linear in the length of the text; the
    parser pulls tokens one at a time and stops at the first error.

    Raises:
        InvalidArgument: At a character that starts no token, or a bad quoted value.
    """
    pos = 0
    while True:
        if space := WHITESPACE.match(text, pos):
            pos = space.end()
        if pos == len(text):
            yield Token(END_TOKEN, "", "", pos)
            return
        if text[pos] == '"':
            token = _quoted(text, pos)
        elif match := WORD.match(text, pos):
            token = Token(WORD_TOKEN, match[0], match[0], pos)
        elif match := OPERATOR.match(text, pos):
            token = Token(OPERATOR_TOKEN, match[0], match[0], pos)
        else:
            raise _invalid(pos, f"unexpected character {text[pos]!r}")
        yield token
        pos += len(token.raw)


def _quoted(text: str, start: int) -> Token:
    """The double-quoted value opening at ``start``; its only escapes are ``\\"`` and ``\\\\``.

    Other escapes are refused rather than kept literally, so that they stay free to mean
    something later.
    """
    parts = []
    pos = start + 1
    while True:
        if plain := PLAIN.match(text, pos):
            parts.append(plain[0])
            pos = plain.end()
        if pos == len(text) or (text[pos] == "\\" and pos + 1 == len(text)):
            raise _invalid(start, 'the quoted value is never closed by a "')
        if text[pos] == '"':
            return Token(QUOTED_TOKEN, "".join(parts), text[start:pos + 1], start)
        escaped = text[pos + 1]
        if escaped not in ('"', "\\"):
            raise _invalid(pos, f"unknown escape {text[pos:pos + 2]!r}; inside quotes only "
                                '\\" and \\\\ are escapes')
        parts.append(escaped)
        pos += 2


def _when(value: Token, name: str) -> datetime:
    """The time a clause compares with, in UTC (a time without offset is taken as UTC)."""
    try:
        when = datetime.fromisoformat(value.text)
        # Out of range in UTC raises OverflowError, e.g. 9999-12-31T23:59:59-23:59.
        return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise _invalid(value.at, f'{name} wants an RFC 3339 time such as '
                                 f'"2026-11-24T00:00:00Z" (years 1 to 9999), '
                                 f'not {excerpt(value.text)}') from exc


def _utc(when: datetime) -> datetime:
    # A naive time would make the comparison raise TypeError; stored times are UTC.
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _found(token: Token) -> str:
    return "the end" if token.kind == END_TOKEN else excerpt(token.raw)


def _invalid(at: int, problem: str) -> InvalidArgument:
    return InvalidArgument({"filter": f"at offset {at}: {problem}"})


def _time(timestamp: Timestamp) -> datetime:
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
