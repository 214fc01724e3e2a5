"""Structured logs: one JSON object per line on stderr, the same shape in every service.

Each line names the trace it was written in (``trace_id``, ``span_id``: the current span's,
e.g. the gRPC call's) and the fields bound for the work at hand (`bound`: ``tenant`` for a
tenant's call); a line about one task passes ``extra=task_fields(...)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

from libs import tracing

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_NONE: Mapping[str, str] = MappingProxyType({})
_bound: ContextVar[Mapping[str, str]] = ContextVar("weir_log_fields", default=_NONE)


@contextmanager
def bound(**fields: str) -> Iterator[None]:
    """Adds ``fields`` to every line logged in this context (threads the gRPC server runs a
    call's handler in inherit it)."""
    token = _bound.set({**_bound.get(), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


def bind(**fields: str) -> Callable[[], None]:
    """`bound` for code that cannot use a with-block (an interceptor); returns the undo."""
    token = _bound.set({**_bound.get(), **fields})
    return lambda: _bound.reset(token)


def task_fields(tenant_id: str, task_id: str, trace_context: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """The fields of a line about one task: its tenant, id and trace."""
    fields = {"tenant": tenant_id, "task_id": task_id}
    if trace_context:
        fields["trace_id"] = tracing.trace_id_of(trace_context)
    return fields


class JsonFormatter(logging.Formatter):
    """Renders a record as JSON; keyword fields passed with ``extra=`` become top-level keys."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = tracing.current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        entry.update(_bound.get())
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(service: str, level: str = "INFO") -> None:
    """Routes every logger of this process to stderr as JSON, tagged with the service name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The drivers are chatty at INFO about every connection; their warnings still show.
    for noisy in ("kafka", "cassandra"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kafka-python warns whenever its IO loop waits >100 ms for the GIL: on a busy 2-core
    # machine that is constant noise, not news.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
