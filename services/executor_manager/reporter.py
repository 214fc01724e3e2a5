"""Reports this executor's load to every dispatcher: each second, and at once on a change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from weir.internal.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from weir.internal.executor_manager.v1 import executor_manager_pb2

log = logging.getLogger(__name__)


class LoadReporter:
    """Dispatchers choose executors by these reports, so a freed slot is announced at once
    (short tasks would otherwise wait up to a whole interval for the next report)."""

    def __init__(self, *, executor_id: str, address: str, dispatchers: list[str],
                 channel_for: Callable[[str], grpc.Channel],
                 load: Callable[[], executor_manager_pb2.GetLoadResponse],
                 interval_seconds: float = 1.0) -> None:
        self._executor_id = executor_id
        self._address = address
        self._stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(channel_for(a))
                       for a in dispatchers]
        self._load = load
        self._interval = interval_seconds
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-reporter", daemon=True)

    def start(self) -> LoadReporter:
        self._thread.start()
        return self

    def changed(self) -> None:
        self._changed.set()

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        self._thread.join(5)
        self.report()  # the last word: draining

    def report(self) -> None:
        load = self._load()
        request = dispatcher_pb2.ReportLoadRequest(
            executor_id=self._executor_id, address=self._address, capacity=load.capacity,
            in_flight=load.in_flight, draining=load.draining)
        for stub in self._stubs:
            try:
                stub.ReportLoad(request, timeout=1)
            except grpc.RpcError as error:
                log.debug("a dispatcher did not take the report", extra={
                    "code": error.code().name})

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._changed.wait(self._interval)
            self._changed.clear()
            self.report()
