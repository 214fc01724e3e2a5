"""Periodic: failing work is logged once, not every round, and its recovery once."""

from __future__ import annotations

import logging
import threading

from libs.periodic import Periodic


def test_work_that_keeps_failing_is_logged_once_then_once_when_it_works_again(caplog):
    rounds, recovered = 0, threading.Event()

    def work() -> None:
        nonlocal rounds
        rounds += 1
        if rounds <= 20:
            raise ConnectionError("Cassandra is away")
        recovered.set()

    with caplog.at_level(logging.INFO, logger="libs.periodic"):
        periodic = Periodic("sweeper", 0.001, work).start()
        assert recovered.wait(10)
        periodic.stop()
    lines = [(r.getMessage(), getattr(r, "failures", None)) for r in caplog.records]
    assert lines == [("periodic work failed", 1), ("periodic work works again", 20)]
