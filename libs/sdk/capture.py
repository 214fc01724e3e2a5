"""Per-attempt capture of what a handler writes: stdout, stderr and `logging` records.

A worker runs several attempts at once, each in a slot thread of its own and in a fresh
`contextvars.Context` (see `libs.sdk.worker`), so one process-wide ``sys.stdout`` cannot tell
them apart by itself. `install` replaces ``sys.stdout`` and ``sys.stderr`` with proxies and
adds a `logging` handler to the root logger; each of them writes to the log of the attempt
whose context is current (a `ContextVar` set by `capturing`), and outside any attempt to the
process's real streams. So attempts running side by side never mix their output.

What is captured: ``print`` and any other write to ``sys.stdout``/``sys.stderr`` (their
``.buffer`` too), and `logging` records of INFO and above (the root logger is set to INFO
unless someone set it already; a handler may lower its own loggers' levels), formatted as
``2026-11-24T10:15:02.123Z INFO name: message``. What is not: output written to the file
descriptors directly (a subprocess, C code, ``os.write(1, …)``), and output of threads the
handler starts itself, which begin with an empty context — run them with
``contextvars.copy_context().run`` to have their output captured.

Each attempt's log is capped (`CappedText`): past ``max_bytes`` of UTF-8, the head and the
tail are kept (half of the cap each) and what lies between is replaced by one line
``[… N bytes dropped …]``. Memory stays within about the cap however much is written.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TextIO

DEFAULT_MAX_BYTES = 64 * 1024
MIN_MAX_BYTES = 1024
MARKER = "\n[… {dropped:,} bytes dropped …]\n"
MARKER_RESERVE = 64  # bytes of the cap kept for the marker (it takes at most 45)
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclass(frozen=True)
class Captured:
    """An attempt's log as it is sent: the text within the cap, whether it was truncated,
    and how many bytes were written in all."""

    text: str
    truncated: bool
    original_bytes: int


def utf8(text: str) -> bytes:
    """Text as UTF-8; a lone surrogate (which UTF-8 cannot hold) as its escape."""
    return text.encode("utf-8", errors="backslashreplace")


class CappedText:
    """Text written in pieces, kept within ``max_bytes`` of UTF-8: its head and its tail.

    Thread-safe: a handler may write from threads of its own (with the attempt's context).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"a log cap is at least {MIN_MAX_BYTES} bytes")
        self.max_bytes = max_bytes
        budget = max_bytes - MARKER_RESERVE
        self._head_max = budget // 2
        self._tail_max = budget - self._head_max  # what a truncated log keeps of the end
        # Until the log is over the cap everything is kept: the head, then the rest here.
        self._keep = max_bytes - self._head_max
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        self.write_bytes(utf8(text))

    def write_bytes(self, data: bytes) -> None:
        """UTF-8 bytes (the caller's to make sure: `write` does)."""
        if not data:
            return
        with self._lock:
            self._total += len(data)
            room = self._head_max - len(self._head)
            if room > 0:
                self._head += data[:room]
                data = data[room:]
                if not data:
                    return
            if len(data) >= self._keep:
                self._tail = bytearray(data[-self._keep:])
            else:
                self._tail += data
                # Trimmed in steps, not at every write: a byte moves a bounded number of times.
                if len(self._tail) > 2 * self._keep:
                    del self._tail[:len(self._tail) - self._keep]

    @property
    def written(self) -> int:
        """Bytes written so far."""
        with self._lock:
            return self._total

    def captured(self) -> Captured:
        """The log within the cap."""
        with self._lock:
            head, tail, total = bytes(self._head), bytes(self._tail), self._total
        if total <= self.max_bytes:
            return Captured((head + tail).decode("utf-8", errors="replace"), False, total)
        # Cut at byte offsets: "ignore" drops the halves of characters cut at the edges
        # (everything written was valid UTF-8, so nothing else).
        first = head.decode("utf-8", errors="ignore")
        last = tail[-self._tail_max:].decode("utf-8", errors="ignore")
        dropped = total - len(utf8(first)) - len(utf8(last))
        return Captured(first + MARKER.format(dropped=dropped) + last, True, total)


def cap_text(text: str, max_bytes: int) -> Captured:
    """``text`` within ``max_bytes``, cut as `CappedText` cuts (head and tail)."""
    capped = CappedText(max_bytes)
    capped.write(text)
    return capped.captured()


_current: ContextVar[CappedText | None] = ContextVar("weir_attempt_log", default=None)


@contextmanager
def capturing(log: CappedText) -> Iterator[CappedText]:
    """Sends what is written in the current context (and contexts copied from it) to ``log``
    while the block runs; the worker runtime wraps each handler call in it."""
    token = _current.set(log)
    try:
        yield log
    finally:
        _current.reset(token)


def current_log() -> CappedText | None:
    """The log of the attempt whose context is current, if any."""
    return _current.get()


class AttemptStream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` of a worker: the current attempt's log, or the real
    stream outside an attempt."""

    def __init__(self, real: TextIO, name: str) -> None:
        super().__init__()
        self._real = real
        self._name = name
        self.buffer = AttemptBuffer(self)

    @property
    def real(self) -> TextIO:
        return self._real

    @property
    def name(self) -> str:
        return self._name

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only on io.TextIOBase too
        return "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]  # read-only on io.TextIOBase
        return "backslashreplace"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        log = _current.get()
        if log is None:
            return self._real.write(text)
        log.write(text)
        return len(text)

    def flush(self) -> None:
        if _current.get() is None:
            self._real.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        """Does nothing: the stream is every attempt's, one handler may not close it."""


class AttemptBuffer(io.RawIOBase):
    """``sys.stdout.buffer``: bytes, read as UTF-8 (anything else as U+FFFD)."""

    def __init__(self, stream: AttemptStream) -> None:
        super().__init__()
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raw = bytes(data)
        log = _current.get()
        if log is None:
            real = getattr(self._stream.real, "buffer", None)
            if real is not None:
                return real.write(raw)
            self._stream.real.write(raw.decode("utf-8", errors="replace"))
            return len(raw)
        log.write(raw.decode("utf-8", errors="replace"))
        return len(raw)

    def flush(self) -> None:
        if _current.get() is None:
            real = getattr(self._stream.real, "buffer", None)
            (real or self._stream.real).flush()

    def close(self) -> None:
        """Does nothing, like `AttemptStream.close`."""


class AttemptLogHandler(logging.Handler):
    """Writes records to the current attempt's log; outside an attempt, WARNING and above to
    the real stderr (as Python does when no handler is configured)."""

    def __init__(self, fallback: TextIO) -> None:
        super().__init__()
        self._fallback = fallback
        formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
        formatter.converter = time.gmtime
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        log = _current.get()
        if log is None and record.levelno < logging.WARNING:
            return
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if log is None:
            self._fallback.write(line)
            self._fallback.flush()
        else:
            log.write(line)


@dataclass(frozen=True)
class Installed:
    stdout: AttemptStream
    stderr: AttemptStream
    handler: AttemptLogHandler
    root_level: int  # the root logger's level before


_installed: Installed | None = None
_install_lock = threading.Lock()


def install() -> Installed:
    """Routes ``sys.stdout``, ``sys.stderr`` and the root logger through the capture (once
    per process; later calls return the first installation)."""
    global _installed
    with _install_lock:
        if _installed is None:
            stdout = AttemptStream(sys.stdout, "<stdout>")
            stderr = AttemptStream(sys.stderr, "<stderr>")
            handler = AttemptLogHandler(stderr.real)
            root = logging.getLogger()
            level = root.level
            root.addHandler(handler)
            if level == logging.WARNING:  # the default: nobody chose one
                root.setLevel(logging.INFO)
            sys.stdout, sys.stderr = stdout, stderr
            _installed = Installed(stdout, stderr, handler, level)
        return _installed


def uninstall() -> None:
    """Undoes `install` (for tests)."""
    global _installed
    with _install_lock:
        if _installed is None:
            return
        root = logging.getLogger()
        root.removeHandler(_installed.handler)
        root.setLevel(_installed.root_level)
        if sys.stdout is _installed.stdout:
            sys.stdout = _installed.stdout.real
        if sys.stderr is _installed.stderr:
            sys.stderr = _installed.stderr.real
        _installed = None
