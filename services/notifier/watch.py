"""Live task event streams: every stage of a task so far, then each new one, until the task
is final — as it stands now: a task re-driven (or retried) after a final stage goes on, so a
watch follows its present life rather than ending at the old final stage.

A stream mostly waits, so it is a coroutine on the server's event loop and holds no thread:
the consumer thread wakes it through `Watchers` when an outcome of its task arrives, and it
looks at the timeline again at least every ``poll_seconds`` (the timeline is also written by
services whose stages travel no topic, e.g. DISPATCHED).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs.cassandra.taskstate import FINAL_STATES, TaskKey, TaskStateStore

Key = tuple[str, str]  # (tenant_id, task_id)


Timeline = tuple[list[tasks_pb2.TaskStage], int]  # the stages, oldest first; the state now


def stages_reader(tasks: TaskStateStore) -> Callable[[str, str], Timeline]:
    """A task's timeline and current state from the store (empty and UNSPECIFIED for a task
    that does not exist)."""
    def stages(tenant_id: str, task_id: str) -> Timeline:
        stored = tasks.get(TaskKey(tenant_id, task_id))
        return (stored.stages(), stored.state) if stored else ([], 0)
    return stages


class Watchers:
    """Who waits for news of which task; `notify` may be called from any thread."""

    def __init__(self) -> None:
        self._callbacks: dict[Key, set[Callable[[], object]]] = {}
        self._lock = threading.Lock()

    def subscribe(self, key: Key, callback: Callable[[], object]) -> Callable[[], None]:
        """Calls ``callback`` on each `notify` of ``key``; returns the unsubscribe."""
        with self._lock:
            self._callbacks.setdefault(key, set()).add(callback)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._callbacks.get(key, set())
                callbacks.discard(callback)
                if not callbacks:
                    self._callbacks.pop(key, None)

        return unsubscribe

    def notify(self, key: Key) -> None:
        with self._lock:
            callbacks = list(self._callbacks.get(key, ()))
        for callback in callbacks:
            callback()


async def watch(stages_of: Callable[[str, str], Timeline],
                watchers: Watchers, tenant_id: str, task_id: str, *,
                poll_seconds: float = 0.25) -> AsyncIterator[records_pb2.TaskEvent]:
    """The task's stages as events, oldest first, then each new one, until the task is in a
    final state whose stage is its latest (an earlier final stage, before a re-drive, is
    sent and passed)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    unsubscribe = watchers.subscribe((tenant_id, task_id),
                                     lambda: loop.call_soon_threadsafe(wake.set))
    sent: set[tuple[int, int, int]] = set()
    try:
        while True:
            wake.clear()
            stages, state = await asyncio.to_thread(stages_of, tenant_id, task_id)
            for stage in stages:
                mark = (stage.state, stage.time.seconds, stage.time.nanos)
                if mark in sent:
                    continue
                sent.add(mark)
                yield records_pb2.TaskEvent(tenant_id=tenant_id, task_id=task_id, stage=stage)
            if state in FINAL_STATES and stages and stages[-1].state == state:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), poll_seconds)
    finally:
        unsubscribe()
