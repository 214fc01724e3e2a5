"""Attempt logs without the engines: the capture in a worker (attempts side by side never mix,
the cap keeps head and tail, logging records are captured), the executor-manager's check of
what a worker sends, the owner's write of a log with the outcome, and the API's paging."""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from weir.internal.dispatcher.v1 import dispatcher_pb2
from weir.worker.v1 import worker_pb2

from libs import config as weir_config, sdk
from libs.cassandra.attempt_logs import StoredLog
from libs.sdk import capture
from libs.sdk.capture import MARKER_RESERVE, CappedText, cap_text, capturing
from libs.sdk.worker import Job, Outbox, Worker, responses, run_handler
from services.executor_manager.pool import checked_log, outcome_of
from services.gateway.attempt_logs import page_of_logs
from tests.helpers import Clock
from tests.unit.test_owner import (
    ECHO,
    PARTITION,
    Acks,
    assignments,
    connect,
    message,
    owning,
)

KIB = 1024


@contextmanager
def installed() -> Iterator[capture.Installed]:
    """The capture installed in this process (pytest's streams of the moment behind it), then
    undone. Inside the test's body: pytest sets sys.stdout again between a test's phases."""
    done = capture.install()
    try:
        yield done
    finally:
        capture.uninstall()


# --- the cap ------------------------------------------------------------------------------

def test_a_log_within_the_cap_is_kept_whole():
    log = CappedText(4 * KIB)
    for i in range(100):
        log.write(f"line {i}\n")
    kept = log.captured()
    assert kept.text == "".join(f"line {i}\n" for i in range(100))
    assert not kept.truncated and kept.original_bytes == len(kept.text)


def test_a_log_exactly_at_the_cap_is_not_truncated():
    log = CappedText(4 * KIB)
    for _ in range(4):
        log.write("x" * KIB)
    kept = log.captured()
    assert kept.text == "x" * 4 * KIB and not kept.truncated


def test_past_the_cap_the_head_and_the_tail_are_kept_around_a_marker():
    log = CappedText(4 * KIB)
    lines = [f"line {i:05d}\n" for i in range(10_000)]  # 11 bytes each, 110,000 in all
    for line in lines:
        log.write(line)
    kept = log.captured()
    assert kept.truncated and kept.original_bytes == 110_000
    assert len(kept.text.encode()) <= 4 * KIB
    head, marker, tail = kept.text.partition("\n[… ")
    assert head.startswith("line 00000\nline 00001\n")
    assert tail.endswith("line 09998\nline 09999\n")
    budget = 4 * KIB - MARKER_RESERVE
    assert len(head) == budget // 2 and len(tail.partition(" bytes dropped …]\n")[2]) == \
        budget - budget // 2
    dropped = int(tail.partition(" bytes dropped")[0].replace(",", ""))
    assert dropped == 110_000 - budget  # every byte is either kept or counted


def test_one_huge_write_is_cut_the_same_way_and_memory_stays_near_the_cap():
    log = CappedText(2 * KIB)
    log.write("a" * 5_000_000 + "THE END")
    kept = log.captured()
    assert kept.truncated and kept.original_bytes == 5_000_007
    assert kept.text.startswith("a" * 100) and kept.text.endswith("aaaTHE END")
    assert len(kept.text.encode()) <= 2 * KIB
    assert len(log._tail) <= 2 * 2 * KIB


def test_characters_cut_at_the_edges_are_dropped_whole_never_half():
    log = CappedText(KIB)
    log.write("é" * 3000)  # two bytes each: the cut falls inside one at either end
    kept = log.captured()
    assert kept.truncated and kept.original_bytes == 6000
    body = kept.text.replace(kept.text[kept.text.index("\n[…"):kept.text.index("…]\n") + 3], "")
    assert set(body) == {"é"}
    assert len(kept.text.encode()) <= KIB
    dropped = int(kept.text.split("[… ")[1].split(" bytes")[0].replace(",", ""))
    assert dropped == 6000 - 2 * len(body)


def test_cap_text_cuts_a_text_as_a_capture_would():
    assert cap_text("short", KIB).text == "short"
    long = cap_text("x" * 10_000, KIB)
    assert long.truncated and long.original_bytes == 10_000 and len(long.text) <= KIB


def test_a_cap_below_the_minimum_is_refused():
    with pytest.raises(ValueError):
        CappedText(100)


# --- the capture --------------------------------------------------------------------------

def test_concurrent_attempts_each_capture_only_their_own_output():
    """Eight attempts in eight threads print and log in turns (each waits for the others to
    write in between): every log holds its own lines, all of them, in order."""
    with installed():
        count, rounds = 8, 20
        logs = [CappedText(64 * KIB) for _ in range(count)]
        barrier = threading.Barrier(count)
        logger = logging.getLogger("tests.attempt_logs.concurrent")

        def attempt(index: int) -> None:
            with capturing(logs[index]):
                for round_ in range(rounds):
                    barrier.wait(10)
                    print(f"out {index} {round_}")
                    sys.stderr.write(f"err {index} {round_}\n")
                    logger.warning("log %d %d", index, round_)

        threads = [threading.Thread(target=contextvars.Context().run, args=(attempt, i))
                   for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for index, log in enumerate(logs):
            lines = log.captured().text.splitlines()
            assert len(lines) == 3 * rounds
            for round_ in range(rounds):
                out, err, record = lines[3 * round_:3 * round_ + 3]
                assert out == f"out {index} {round_}"
                assert err == f"err {index} {round_}"
                assert record.endswith(f"WARNING tests.attempt_logs.concurrent: log {index} "
                                       f"{round_}")


def test_logging_records_from_info_up_are_captured_with_time_level_and_logger():
    with installed():
        log = CappedText()
        logger = logging.getLogger("tests.attempt_logs.levels")
        with capturing(log):
            logger.debug("not this one")
            logger.info("hello %s", "world")
            logging.error("from the root")
        first, second = log.captured().text.splitlines()
        stamp, _, rest = first.partition(" ")
        assert rest == "INFO tests.attempt_logs.levels: hello world"
        assert datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")  # UTC, milliseconds
        assert second.endswith(" ERROR root: from the root")


def test_outside_an_attempt_output_goes_to_the_real_streams(capsys):
    with installed():
        print("no attempt here")
        logging.getLogger("tests.attempt_logs.outside").info("not shown: below WARNING")
        logging.getLogger("tests.attempt_logs.outside").warning("shown on stderr")
        out, err = capsys.readouterr()
        assert "no attempt here" in out
        assert "shown on stderr" in err and "not shown" not in err


def test_binary_writes_and_writelines_are_captured_too():
    with installed():
        log = CappedText()
        with capturing(log):
            sys.stdout.buffer.write("bytes é\n".encode())
            sys.stdout.buffer.write(b"\xff\n")  # not UTF-8: replaced, not an error
            sys.stdout.writelines(["a\n", "b\n"])
            sys.stdout.flush()
            sys.stdout.close()  # a handler may not close everyone's stream
        assert log.captured().text == "bytes é\n\ufffd\na\nb\n"
        assert not sys.stdout.closed


def test_a_thread_the_handler_starts_is_captured_only_with_the_attempts_context(capsys):
    with installed():
        log = CappedText()
        with capturing(log):
            plain = threading.Thread(target=print, args=("from a plain thread",))
            copied = threading.Thread(target=contextvars.copy_context().run,
                                      args=(print, "from a thread with the context"))
            for thread in (plain, copied):
                thread.start()
                thread.join()
        assert log.captured().text == "from a thread with the context\n"
        assert "from a plain thread" in capsys.readouterr().out


@sdk.task
def chatty(payload: bytes) -> bytes:
    print(f"attempt {sdk.current_attempt().attempt_number} says {payload.decode()}")
    logging.getLogger("chatty").info("and logs")
    if payload == b"fail":
        raise sdk.RetryableError("failing on purpose")
    return payload


def test_a_handler_that_raises_ends_its_log_with_the_traceback():
    with installed():
        log = CappedText()
        attempt = sdk.Attempt(tenant_id="t", task_id="x", function="f", attempt_number=3,
                              deadline=None)
        outcome = run_handler(chatty, b"fail", attempt, log=log)
        assert isinstance(outcome, worker_pb2.HandlerError)
        text = log.captured().text
        assert text.startswith("attempt 3 says fail\n")
        assert " INFO chatty: and logs\n" in text
        assert "Traceback (most recent call last)" in text
        assert text.rstrip().endswith("RetryableError: failing on purpose")


def test_the_worker_sends_each_attempts_log_with_its_end():
    with installed():
        runtime = Worker(allowed_packages=("tests.unit",), slots=1, log_max_bytes=2 * KIB)
        outbox = Outbox()
        assignments_ = [worker_pb2.AttemptAssignment(
            attempt_id=f"a{i}", tenant_id="t", task_id=f"x{i}", function="f",
            handler=f"{__name__}:chatty", payload=payload, attempt_number=1)
            for i, payload in enumerate([b"hello", b"x" * 5000])]
        outbox.accept(a.attempt_id for a in assignments_)
        for assignment in assignments_:
            runtime._run(Job(assignment, 1, outbox))
        [message_] = list(responses(outbox.take()))
        first, second = message_.updates
        assert first.result == b"hello" and first.log.text.startswith("attempt 1 says hello\n")
        assert not first.log.truncated and first.log.original_bytes == len(first.log.text)
        assert second.log.truncated and second.log.original_bytes > 5000
        assert len(second.log.text.encode()) <= 2 * KIB


def test_an_attempt_that_wrote_nothing_sends_no_log():
    update = next(responses({"a": [1, 2, b"", None, capture.Captured("", False, 0)]})).updates[0]
    assert not update.HasField("log")


# --- the executor-manager's check ---------------------------------------------------------

def test_the_executor_manager_cuts_a_log_a_worker_sent_past_the_cap():
    honest = worker_pb2.CapturedLog(text="fine\n", original_bytes=5)
    assert checked_log(honest, 2 * KIB) == honest
    lying = worker_pb2.CapturedLog(text="y" * 100_000, truncated=False, original_bytes=3)
    cut = checked_log(lying, 2 * KIB)
    assert cut is not None and cut.truncated and len(cut.text.encode()) <= 2 * KIB
    assert cut.original_bytes == 100_000  # at least what it sent
    assert checked_log(worker_pb2.CapturedLog(), 2 * KIB) is None


def test_an_end_update_becomes_a_result_with_its_checked_log():
    update = worker_pb2.AttemptUpdate(attempt_id="a", result=b"r")
    update.start_time.seconds, update.end_time.seconds = 1, 2
    update.log.text, update.log.original_bytes = "z" * 5000, 5000
    result = outcome_of("a", None, update, log_max_bytes=KIB)
    assert result.log is not None and result.log.truncated
    assert len(result.log.text.encode()) <= KIB
    update.ClearField("log")
    assert outcome_of("a", None, update).log is None


# --- the owner ----------------------------------------------------------------------------

def ended(assignment: dispatcher_pb2.Assignment, text: str) -> dispatcher_pb2.AttemptReport:
    now = datetime.now(UTC)
    report = dispatcher_pb2.AttemptReport(attempt_id=assignment.attempt_id,
                                          topic=assignment.topic,
                                          partition=assignment.partition, result=b"r")
    report.start_time.FromDatetime(now)
    report.end_time.FromDatetime(now)
    if text:
        report.log.text, report.log.original_bytes = text, len(text)
    return report


def test_an_attempts_log_is_written_in_the_flush_of_its_outcome_at_the_same_timestamp():
    owner = owning(Clock(1000.0))
    owner.take(PARTITION, message("a"), ECHO, Acks().record())
    owner.take(PARTITION, message("quiet"), ECHO, Acks().record())
    connect(owner, credits=2)
    first, second = assignments(owner)
    owner.work(1, dispatcher_pb2.WorkRequest(reports=[ended(first, "printed\n"),
                                                      ended(second, "")]))
    batch = owner.collect()
    [(log, stamp)] = batch.logs
    assert (log.tenant_id, log.task_id, log.attempt_number) == ("t1", "a", 1)
    assert log.text == "printed\n" and not log.truncated and log.original_bytes == 8
    assert stamp == next(w.timestamp for w in batch.writes if w.key.task_id == "a")
    assert owner.collect().logs == []  # written once


def test_a_stale_reports_log_is_not_written():
    owner = owning(Clock(1000.0))
    connect(owner, credits=1)
    stale = dispatcher_pb2.Assignment(attempt_id=f"{PARTITION[0]}/{PARTITION[1]}/2/99",
                                      topic=PARTITION[0], partition=PARTITION[1])
    owner.work(1, dispatcher_pb2.WorkRequest(reports=[ended(stale, "late\n")]))
    assert owner.collect().logs == []


# --- the API's pages ----------------------------------------------------------------------

def stored(number: int, text: str = "x") -> StoredLog:
    now = datetime.now(UTC)
    return StoredLog(attempt_number=number, text=text, truncated=False,
                     original_bytes=len(text), end_time=now,
                     expire_time=now + timedelta(days=7))


def numbers_and_texts(page) -> list[tuple[int, str]]:
    return [(log.attempt_number, log.text) for log in page]


def test_a_page_has_one_log_per_attempt_empty_where_none_is_stored():
    page, after = page_of_logs("t", [stored(2, "two")], start=1, attempt_count=3,
                               page_size=10)
    assert numbers_and_texts(page) == [(1, ""), (2, "two"), (3, "")]
    assert after is None
    assert page[1].HasField("create_time") and not page[0].HasField("create_time")


def test_pages_continue_where_the_last_ended():
    logs = [stored(n, f"log {n}") for n in range(1, 6)]
    page, after = page_of_logs("t", logs[:3], start=1, attempt_count=5, page_size=2)
    assert numbers_and_texts(page) == [(1, "log 1"), (2, "log 2")] and after == 3
    page, after = page_of_logs("t", logs[2:], start=3, attempt_count=5, page_size=2)
    assert [n for n, _ in numbers_and_texts(page)] == [3, 4] and after == 5
    page, after = page_of_logs("t", logs[4:], start=5, attempt_count=5, page_size=2)
    assert [n for n, _ in numbers_and_texts(page)] == [5] and after is None


def test_a_page_ends_early_once_it_holds_enough_text():
    logs = [stored(n, "x" * 1000) for n in range(1, 5)]
    page, after = page_of_logs("t", logs, start=1, attempt_count=4, page_size=10,
                               max_bytes=1500)
    assert len(page) == 2 and after == 3


def test_a_log_stored_before_the_tasks_count_caught_up_is_listed():
    page, after = page_of_logs("t", [stored(3, "three")], start=1, attempt_count=2,
                               page_size=10)
    assert numbers_and_texts(page) == [(1, ""), (2, ""), (3, "three")] and after is None


def test_a_task_that_never_ran_has_no_logs():
    assert page_of_logs("t", [], start=1, attempt_count=0, page_size=10) == ([], None)


# --- settings -----------------------------------------------------------------------------

def test_the_cap_and_the_retention_are_settings_with_bounds():
    config = weir_config.load({})
    assert config.attempt_log_max_bytes == 64 * KIB
    assert config.attempt_log_retention_seconds == 7 * 24 * 3600
    with pytest.raises(weir_config.ConfigError) as error:
        weir_config.load({"WEIR_ATTEMPT_LOG_MAX_BYTES": "10",
                          "WEIR_ATTEMPT_LOG_RETENTION_SECONDS": "0"})
    assert "WEIR_ATTEMPT_LOG_MAX_BYTES" in str(error.value)
    assert "WEIR_ATTEMPT_LOG_RETENTION_SECONDS" in str(error.value)


def test_install_is_undone_by_uninstall():
    before_out, before_err = sys.stdout, sys.stderr
    level = logging.getLogger().level
    capture.install()
    assert isinstance(sys.stdout, capture.AttemptStream)
    capture.uninstall()
    assert (sys.stdout, sys.stderr) == (before_out, before_err)
    assert logging.getLogger().level == level
