"""Handlers the task-semantics tests register (workers import them as ``tests.handlers:…``)."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
import urllib.error
import urllib.request
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path

from libs import sdk

ERRORS = {"RETRYABLE": sdk.RetryableError, "THROTTLED": sdk.ThrottledError,
          "NON_RETRYABLE": sdk.NonRetryableError}


@sdk.task
def flaky(payload: bytes) -> bytes:
    """Fails until attempt ``succeed_on``, with the error class ``error`` and, if given,
    asking for a retry after ``retry_after`` seconds. Payload: JSON of those keys."""
    spec = json.loads(payload)
    attempt = sdk.current_attempt().attempt_number
    if attempt < spec["succeed_on"]:
        retry_after = spec.get("retry_after")
        raise ERRORS[spec.get("error", "RETRYABLE")](
            f"attempt {attempt} fails on purpose",
            retry_after=timedelta(seconds=retry_after) if retry_after else None)
    return f"succeeded on attempt {attempt}".encode()


@sdk.task
def strict(payload: bytes) -> bytes:
    """Accepts only the payload ``good``; anything else is a non-retryable bad input."""
    if payload != b"good":
        raise sdk.NonRetryableError(f"bad input {payload!r}")
    return b"accepted"


@sdk.task
def spin(payload: bytes) -> bytes:
    """Burns the CPU seconds written in its payload (e.g. b"1.5"); returns its process id."""
    end = time.process_time() + float(payload)
    while time.process_time() < end:
        pass
    return str(os.getpid()).encode()


def unmarked(payload: bytes) -> bytes:
    """Not marked with @sdk.task, so workers must refuse it: it writes "ran" to the file
    named by its payload, which shows whether it ever ran."""
    Path(payload.decode()).write_text("ran")
    return b"ran"


LIMITS = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_NPROC")


def _probe(path: str) -> dict[str, object]:
    """What the process can see at ``path``: a directory's entries or a file's size."""
    try:
        if os.path.isdir(path):
            return {"readable": True, "entries": sorted(os.listdir(path))}
        with open(path, "rb") as file:
            return {"readable": True, "bytes": len(file.read())}
    except OSError as exc:
        return {"readable": False, "error": type(exc).__name__}


@sdk.task
def sandbox_report(payload: bytes) -> bytes:
    """What the worker process running it may do, as JSON: its user and groups, resource
    limits, environment, capabilities, and what it sees at each path of the payload (a JSON
    list) and at its own repository's ``.weir``."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    own_weir = Path(__file__).resolve().parents[1] / ".weir"
    return json.dumps({
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
        "groups": os.getgroups(),
        "limits": {name: resource.getrlimit(getattr(resource, name)) for name in LIMITS},
        "environment": sorted(os.environ),
        "capabilities": int(status["CapEff"].strip(), 16),
        "no_new_privs": status["NoNewPrivs"].strip() == "1",
        "paths": {path: _probe(path) for path in json.loads(payload or b"[]")},
        "own_weir": {str(own_weir): _probe(str(own_weir))},
    }).encode()


# Attempts of each function inside this worker process right now, for `overlap`.
_inside: dict[tuple[str, str], int] = {}
_inside_lock = threading.Lock()


@sdk.task
def overlap(payload: bytes) -> bytes:
    """Sleeps the milliseconds in its payload; returns, as JSON, its process id and how many
    attempts of its function (itself included) this process was running when it entered."""
    attempt = sdk.current_attempt()
    key = (attempt.tenant_id, attempt.function)
    with _inside_lock:
        _inside[key] = inside = _inside.get(key, 0) + 1
    try:
        time.sleep(int(payload or b"0") / 1000)
    finally:
        with _inside_lock:
            _inside[key] -= 1
    return json.dumps({"pid": os.getpid(), "inside": inside}).encode()


@sdk.task
def crash(payload: bytes) -> bytes:
    """Ends its worker process at once with the exit status in its payload (e.g. b"3"), as a
    handler that segfaults or calls os._exit would."""
    os._exit(int(payload or b"1"))


_seen: ContextVar[str | None] = ContextVar("tests_handlers_seen", default=None)


@sdk.task
def whoami(payload: bytes) -> bytes:
    """The attempt as `sdk.current_attempt()` tells it, as JSON, after sleeping the
    milliseconds in its payload; ``leaked`` is what an earlier attempt left in a ContextVar
    (it must be None: each attempt gets a fresh context)."""
    leaked = _seen.get()
    attempt = sdk.current_attempt()
    _seen.set(attempt.task_id)
    time.sleep(int(payload or b"0") / 1000)
    again = sdk.current_attempt()  # still its own after other slots ran theirs meanwhile
    return json.dumps({
        "tenant_id": again.tenant_id, "task_id": again.task_id, "function": again.function,
        "attempt_number": again.attempt_number,
        "deadline": again.deadline.isoformat() if again.deadline else None,
        "leaked": leaked, "pid": os.getpid()}).encode()


@sdk.task
def downstream(payload: bytes) -> bytes:
    """Calls the URL in its payload, as a handler calls a downstream service: a 429 answer
    (the downstream throttling) is a THROTTLED failure."""
    try:
        with urllib.request.urlopen(payload.decode(), timeout=10) as answer:
            return answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            raise sdk.ThrottledError("the downstream throttled the call") from None
        raise


@sdk.task
def talk(payload: bytes) -> bytes:
    """Writes to stdout, stderr and `logging`, for the attempt-log tests. Payload: JSON with
    ``say`` (a line printed, with the attempt number, ``lines`` times, ``pause_ms`` apart),
    ``bytes`` (that many more bytes printed: line numbers, to overflow the cap) and
    ``fail_before`` (attempts before that one raise, retryably)."""
    spec = json.loads(payload or b"{}")
    number = sdk.current_attempt().attempt_number
    say = spec.get("say", "hello")
    for _ in range(spec.get("lines", 1)):
        print(f"{say} (attempt {number})")
        time.sleep(spec.get("pause_ms", 0) / 1000)
    sys.stderr.write(f"on stderr (attempt {number})\n")
    logging.getLogger("tests.handlers.talk").info("logged (attempt %d)", number)
    written, line = 0, 0
    while written < spec.get("bytes", 0):
        text = f"filler line {line:08d}\n"
        sys.stdout.write(text)
        written, line = written + len(text), line + 1
    if spec.get("bytes"):
        print("the last line")
    if number < spec.get("fail_before", 0):
        raise sdk.RetryableError(f"attempt {number} fails on purpose")
    return f"{say} (attempt {number})".encode()
