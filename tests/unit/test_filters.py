"""The list filter grammar: every form it reads, the errors it gives, and its linear cost."""

import contextlib
import gc
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from weir.v1 import common_pb2, tasks_pb2

from libs.cassandra.dead_letters import DeadLetterRow
from libs.errors import InvalidArgument
from services.gateway.filters import MAX_FILTER_CHARS, DeadLetterFilter, TaskFilter

FAILED = tasks_pb2.TaskState.TASK_STATE_FAILED


def task(created: str = "2026-11-24T12:00:00Z", **fields: object) -> tasks_pb2.Task:
    when = Timestamp()
    when.FromJsonString(created)
    return tasks_pb2.Task(create_time=when, **fields)


def problem(text: str) -> str:
    """The description of the `filter` violation that ``text`` raises."""
    with pytest.raises(InvalidArgument) as raised:
        TaskFilter.parse(text)
    assert set(raised.value.violations) == {"filter"}
    return raised.value.violations["filter"]


def fastest(text: str, *, runs: int = 5,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds to parse (or refuse) ``text``, the fastest of ``runs`` tries.

    On a busy machine some tries are preempted; each lasts at most a few milliseconds, so the
    fastest most likely was not. The garbage collector is paused, as timeit does.
    """
    best = float("inf")
    gc.disable()
    try:
        for _ in range(runs):
            start = clock()
            with contextlib.suppress(InvalidArgument):
                TaskFilter.parse(text)
            best = min(best, clock() - start)
    finally:
        gc.enable()
    return best


@pytest.mark.parametrize("text", [
    'function = "resize"', "function = resize", 'function="resize"', "function=resize",
    'function != "other"', "state = TASK_STATE_FAILED", 'state = "TASK_STATE_FAILED"',
    "state != TASK_STATE_SUCCEEDED", 'create_time >= "2026-11-24T00:00:00Z"',
    "create_time > 2026-11-24T00:00:00Z", 'create_time <= "2026-11-24T13:00:00+01:00"',
    'create_time < "2026-11-25"', 'labels.customer = "acme"', 'labels.a-b_c.d = "x"',
    '  function = "resize"  AND  state = TASK_STATE_FAILED  ',
    '\tfunction = "resize"\nAND state = TASK_STATE_FAILED',
])
def test_every_form_of_clause_reads_and_matches_a_failed_resize_task(text):
    item = task(function="resize", state=FAILED,
                labels={"customer": "acme", "a-b_c.d": "x"})
    assert TaskFilter.parse(text).matches(item)


def test_clauses_joined_by_and_must_all_hold():
    f = TaskFilter.parse('function = "resize" AND state = TASK_STATE_FAILED AND '
                         'create_time >= "2026-11-24T00:00:00Z" AND labels.customer = "acme"')
    assert f.matches(task(function="resize", state=FAILED, labels={"customer": "acme"}))
    assert not f.matches(task(function="resize", state=FAILED, labels={"customer": "other"}))
    assert not f.matches(task(function="resize", state=FAILED, labels={"customer": "acme"},
                              created="2026-11-23T23:59:59Z"))


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_or_blank_filter_matches_everything(text):
    f = TaskFilter.parse(text)
    assert f.checks == []
    assert f.matches(task(function="anything"))


def test_a_quoted_value_may_hold_and_and_any_other_character():
    f = TaskFilter.parse('labels.note = "x AND y OR (z) = \'w\' <= ~" AND function = f')
    assert f.matches(task(function="f", labels={"note": "x AND y OR (z) = 'w' <= ~"}))
    assert len(f.checks) == 2


def test_a_quoted_value_escapes_only_quotes_and_backslashes():
    f = TaskFilter.parse(r'labels.note = "say \"hi\" \\ AND bye\\"')
    assert f.matches(task(labels={"note": 'say "hi" \\ AND bye\\'}))
    assert TaskFilter.parse('function = ""').matches(task(function=""))


def test_a_missing_label_reads_as_empty():
    assert TaskFilter.parse('labels.customer = ""').matches(task())
    assert TaskFilter.parse('labels.customer != "acme"').matches(task())


def test_a_time_without_offset_is_utc_and_an_offset_is_honoured():
    item = task(created="2026-11-24T12:00:00Z")
    assert TaskFilter.parse('create_time = "2026-11-24T12:00:00"').matches(item)
    assert TaskFilter.parse('create_time = "2026-11-24T13:00:00+01:00"').matches(item)
    assert not TaskFilter.parse('create_time > "2026-11-24T12:30:00+00:30"').matches(item)


def test_a_naive_item_time_is_compared_as_utc_instead_of_raising():
    row = DeadLetterRow(datetime(2026, 11, 25, 10), "t1", "resize", 0)
    assert DeadLetterFilter.parse('dead_letter_time >= "2026-11-25T09:00:00Z"').matches(row)


def test_the_dead_letter_filter_has_its_own_fields():
    row = DeadLetterRow(datetime(2026, 11, 25, 10, tzinfo=UTC), "t1", "resize",
                        common_pb2.ErrorClass.ERROR_CLASS_NON_RETRYABLE)
    f = DeadLetterFilter.parse('function = "resize" AND error_class = ERROR_CLASS_NON_RETRYABLE '
                               'AND dead_letter_time >= "2026-11-25T00:00:00Z"')
    assert f.matches(row)
    with pytest.raises(InvalidArgument):
        DeadLetterFilter.parse("state = TASK_STATE_FAILED")


@pytest.mark.parametrize(("text", "says"), [
    ("colour = red", "at offset 0: unknown field 'colour'; known: create_time, function, "
                     "labels.<key>, state"),
    ("Function = x", "at offset 0: unknown field 'Function'"),
    ("function.x = y", "at offset 0: unknown field 'function.x'"),
    ("labels. = x", "at offset 7: a labels key"),
    ("labels.a:b = x", "at offset 7: a labels key"),
    ('function > "a"', "at offset 9: function supports only = and !="),
    ("state <= TASK_STATE_FAILED", "at offset 6: state supports only = and !="),
    ("labels.k < v", "at offset 9: labels.<key> supports only = and !="),
    ("state = NOPE", "at offset 8: unknown state 'NOPE'"),
    ("state = task_state_failed", "at offset 8: unknown state"),
    ('create_time < "yesterday"', "at offset 14: create_time wants an RFC 3339 time"),
    ('function = "abc', 'at offset 11: the quoted value is never closed by a "'),
    ('function = "abc\\', 'at offset 11: the quoted value is never closed by a "'),
    ('function = "a\\n"', "at offset 13: unknown escape '\\\\n'"),
    ('function = "a" AND', "at offset 18: expected a field name, found the end"),
    ('function = "a" AND ', "at offset 19: expected a field name, found the end"),
    ('function = "a" AND AND state = TASK_STATE_FAILED', "at offset 19: expected a field name, "
                                                         "found 'AND'"),
    ('AND function = "a"', "at offset 0: expected a field name, found 'AND'"),
    ('function = "a" and state = TASK_STATE_FAILED', "at offset 15: expected AND or the end, "
                                                     "found 'and'"),
    ('function = "a" OR 1=1', "at offset 15: expected AND or the end, found 'OR'"),
    ('function = "a" "b"', "at offset 15: expected AND or the end"),
    ("function resize", "at offset 9: expected an operator"),
    ("function == resize", "at offset 10: expected a value, found '='"),
    ("function = ", "at offset 11: expected a value, found the end"),
    ("= resize", "at offset 0: expected a field name, found '='"),
    ("function ~ resize", "at offset 9: unexpected character '~'"),
    ("function = 'resize'", "at offset 11: unexpected character \"'\""),
])
def test_a_filter_that_cannot_be_read_says_where(text, says):
    assert problem(text).startswith(says)


@pytest.mark.parametrize("when", [
    "0000-01-01T00:00:00Z",  # year 0
    "10000-01-01T00:00:00Z",
    "9999-12-31T23:59:59-23:59",  # past year 9999 in UTC
    "0001-01-01T00:00:00+23:59",  # before year 1 in UTC
    "2026-13-01T00:00:00Z",
    "2026-11-24T25:00:00Z",
    "2026-11-24T00:00:00+24:00",
    "9" * 4000,
])
def test_a_time_out_of_range_is_invalid_argument_not_a_crash(when):
    assert "create_time wants an RFC 3339 time" in problem(f'create_time >= "{when}"')
    with pytest.raises(InvalidArgument) as raised:
        DeadLetterFilter.parse(f"dead_letter_time < {when}")
    assert "filter" in raised.value.violations


def test_the_extreme_times_in_range_are_read():
    assert TaskFilter.parse('create_time >= "0001-01-01T00:00:00Z"').matches(task())
    assert TaskFilter.parse('create_time < "9999-12-31T23:59:59Z"').matches(task())


def test_a_filter_of_4096_characters_is_read_and_4097_refused_before_parsing():
    clause = 'function = "x"'
    text = clause + " " * (MAX_FILTER_CHARS - len(clause))
    assert len(TaskFilter.parse(text).checks) == 1
    # Past the limit even a readable filter is refused, without being read.
    assert problem(text + " ") == "at most 4096 characters, not 4097"


def test_errors_quote_only_a_short_excerpt_of_the_input():
    for text in ["x" * 4000 + " = y", 'function = "a" ' + "z" * 4000,
                 'state = "' + "Q" * 4000 + '"', "labels." + "é" * 4000 + " = v"]:
        assert len(problem(text)) < 200


HOSTILE = {
    "one long run of spaces": "a" + " " * 4000 + "a",
    "a thousand ANDs": "a" + " AND" * 1000,
    "only quotes": '"' * 4000,
    "only equals signs": "=" * 4000,
    "an unclosed quote after a clause": 'function = "' + "\\\\" * 1990,
    "many clauses": 'labels.k = "v" AND ' * 200 + 'labels.k = "v"',
    "far too long": "a" + " " * 40_000 + "a",
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_filter_is_read_or_refused_in_well_under_50_ms(text):
    assert fastest(text) < 0.050


@pytest.mark.parametrize("make", [
    lambda n: "a" + " " * n + "a",
    lambda n: 'function = "' + "\\\"" * (n // 2) + '"',
    lambda n: 'labels.k = "v" AND ' * (n // 19),
], ids=["spaces", "escapes", "clauses"])
def test_parse_time_grows_linearly_with_the_length_of_the_filter(make):
    # Eight times the text: linear costs up to 8x, quadratic about 64x (the regex split this
    # replaces measured 28x to 63x); 16x leaves a factor of two either side for a busy machine.
    # Thread CPU time leaves out the time other processes hold the cores.
    short, long = (fastest(make(n), runs=25, clock=time.thread_time) for n in (500, 4000))
    assert long < 16 * short
