"""Where the executor sends a partition's reports when dispatchers disagree about who owns it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from services.executor_manager.engine import DispatcherLink, Executor

PARTITION = ("weir.tasks.normal", 3)


def link(address: str, owned: dict[tuple[str, int], int], *, connected: bool = True
         ) -> DispatcherLink:
    def ignore(*_: Any) -> None:
        return None

    return DispatcherLink(address=address, stub=None, executor_id="em-1",  # type: ignore[arg-type]
                          on_response=ignore, on_connect=ignore, connected=connected,
                          owned=owned)


def executor_with(*links: DispatcherLink) -> Executor:
    executor = Executor(executor_id="em-1", pool=None,  # type: ignore[arg-type]
                        lease=timedelta(seconds=30))
    executor._links.extend(links)
    return executor


def test_a_frozen_owner_that_still_lists_a_partition_loses_it_to_the_higher_epoch() -> None:
    zombie = link("frozen", {PARTITION: 3})
    survivor = link("survivor", {PARTITION: 4})
    executor = executor_with(zombie, survivor)
    assert executor._owner_of(PARTITION, zombie) is survivor


def test_a_disconnected_claim_does_not_count() -> None:
    newer = link("newer", {PARTITION: 9}, connected=False)
    older = link("older", {PARTITION: 2})
    assert executor_with(newer, older)._owner_of(PARTITION, newer) is older


def test_with_no_claim_at_all_the_stream_it_came_from_is_used() -> None:
    origin = link("origin", {})
    assert executor_with(origin, link("other", {}))._owner_of(PARTITION, origin) is origin


def test_with_owners_known_but_none_for_this_partition_the_report_waits() -> None:
    origin = link("origin", {})
    assert executor_with(origin, link("other", {("weir.tasks.high", 0): 1}))._owner_of(
        PARTITION, origin) is None
