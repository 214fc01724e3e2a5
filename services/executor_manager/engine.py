"""The executor: takes work from every dispatcher by credit and runs it in its worker pool.

One Work stream per dispatcher (`DispatcherLink`). The executor grants each stream credits
for its free slots, receives assignments in batches, submits them to the pool, and reports
starts and outcomes in batches — to the dispatcher that owns the task's partition now.
Dispatchers announce the partitions they own with their epochs; where two claim one (the
loser frozen or cut off, not knowing yet) the higher epoch wins, and a report sent to one that
lost the partition comes back `moved` and waits for the new owner. An end report is kept until
its owner says it is stored (`durable`) and sent again otherwise, so an outcome outlives an
owner's crash or takeover. It renews the leases of what runs every third of a lease, and
stops an attempt its owner calls `stale` (the task moved on) or asks to `cancel`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2
from opentelemetry.trace import Span, SpanKind
from weir.internal.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from weir.internal.executor_manager.v1 import executor_manager_pb2
from weir.v1 import common_pb2

from libs import tracing
from libs.batching import BATCH_BYTES, chunks_by_size
from libs.cassandra.taskstate import timestamp_of
from services.executor_manager.pool import AttemptResult, AttemptSpec, PoolClosed, WorkerPool

log = logging.getLogger(__name__)

SEND_SECONDS = 0.002  # reports and credits wait at most this long to travel together
RESEND_SECONDS = 2.0  # an end report not confirmed stored by then is sent again
PartitionId = tuple[str, int]
HIGH = common_pb2.Priority.PRIORITY_HIGH


@dataclass
class Running:
    """An attempt this executor holds, and where its reports go."""

    attempt_id: str
    partition: PartitionId
    link: DispatcherLink  # the stream it came from
    span: Span | None = None  # when the task's trace is sampled
    handler: str = ""


@dataclass
class DispatcherLink:
    """One Work stream to one dispatcher, reconnected when it breaks."""

    address: str
    stub: dispatcher_pb2_grpc.DispatcherServiceStub
    executor_id: str
    on_response: Callable[[DispatcherLink, dispatcher_pb2.WorkResponse], None]
    on_connect: Callable[[DispatcherLink], None]
    connected: bool = False
    disconnected_at: float = field(default_factory=time.monotonic)
    outstanding: int = 0  # credits granted and not yet used
    below_high: int | None = None  # of those, what NORMAL and LOW may use, as last told
    owned: dict[PartitionId, int] = field(default_factory=dict)  # partition -> its epoch
    _outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> DispatcherLink:
        threading.Thread(target=self._run, name=f"link-{self.address}", daemon=True).start()
        return self

    def send(self, request: dispatcher_pb2.WorkRequest) -> None:
        self._outbox.put(request)

    def stop(self) -> None:
        self._stopping.set()
        self._outbox.put(None)

    def _requests(self) -> Iterator[dispatcher_pb2.WorkRequest]:
        yield dispatcher_pb2.WorkRequest(executor_id=self.executor_id)
        while True:
            request = self._outbox.get()
            if request is None:
                return
            yield request

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._outbox = queue.SimpleQueue()
            self.outstanding = 0
            self.below_high = None
            try:
                # Waits for a dispatcher that is starting instead of failing at once.
                responses = self.stub.Work(self._requests(), wait_for_ready=True)
                first = True
                for response in responses:
                    if first:
                        first, failures = False, 0
                        self.connected = True
                        log.info("work stream open", extra={"dispatcher": self.address})
                        self.on_connect(self)
                    self.on_response(self, response)
            except grpc.RpcError as error:
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    log.warning("work stream broke; reconnecting", extra={
                        "dispatcher": self.address, "code": error.code().name})
            except Exception:
                failures += 1
                log.exception("work stream failed; reconnecting",
                              extra={"dispatcher": self.address})
            if self.connected:
                self.connected = False
                self.disconnected_at = time.monotonic()
                self.owned = {}
            self._stopping.wait(min(0.1 * failures, 2.0))


class Executor:
    """Runs what the dispatchers hand out, within its pool's capacity."""

    def __init__(self, *, executor_id: str, pool: WorkerPool, lease: timedelta) -> None:
        self.executor_id = executor_id
        self._pool = pool
        self._lease = lease
        self._links: list[DispatcherLink] = []
        self._running: dict[str, Running] = {}
        self._reports: dict[str, list[dispatcher_pb2.AttemptReport]] = {}  # by attempt id
        self._homeless: list[dispatcher_pb2.AttemptReport] = []  # their owner is unknown
        # End reports sent and not yet confirmed stored: (report, when last sent).
        self._unacked: dict[str, tuple[dispatcher_pb2.AttemptReport, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._draining = False
        self._sender = threading.Thread(target=self._send_loop, name="work-sender", daemon=True)
        self._renewals = itertools.count()

    def connect(self, addresses: Sequence[str],
                channel_for: Callable[[str], grpc.Channel]) -> Executor:
        for address in addresses:
            self._links.append(DispatcherLink(
                address=address, stub=dispatcher_pb2_grpc.DispatcherServiceStub(
                    channel_for(address)),
                executor_id=self.executor_id, on_response=self._response,
                on_connect=lambda link: self._wake.set()).start())
        self._sender.start()
        return self

    # --- the pool's callbacks --------------------------------------------------------------

    def started(self, attempt_id: str, at: datetime) -> None:
        with self._lock:
            running = self._running.get(attempt_id)
            if running is None:
                return
            report = dispatcher_pb2.AttemptReport(
                attempt_id=attempt_id, topic=running.partition[0],
                partition=running.partition[1], start_time=timestamp_of(at))
            self._queue_report(running, report)

    def done(self, results: Sequence[AttemptResult]) -> None:
        with self._lock:
            for result in results:
                running = self._running.pop(result.attempt_id, None)
                if running is None:
                    continue
                report = dispatcher_pb2.AttemptReport(
                    attempt_id=result.attempt_id, topic=running.partition[0],
                    partition=running.partition[1], end_time=timestamp_of(result.end_time),
                    result=result.result, error_class=result.error_class,
                    exit_reason=result.exit_reason)
                if result.start_time is not None:
                    report.start_time.CopyFrom(timestamp_of(result.start_time))
                if result.status is not None:
                    report.status.CopyFrom(result.status)
                if result.retry_delay is not None:
                    delay = Duration()
                    delay.FromTimedelta(result.retry_delay)
                    report.retry_delay.CopyFrom(delay)
                if result.log is not None:
                    report.log.CopyFrom(result.log)
                self._unacked[result.attempt_id] = (report, time.monotonic())
                self._queue_report(running, report)
                if running.span is not None:
                    _trace_result(running, result)
        self._wake.set()

    def _queue_report(self, running: Running, report: dispatcher_pb2.AttemptReport) -> None:
        self._reports.setdefault(running.attempt_id, []).append(report)
        self._wake.set()

    # --- what dispatchers send -------------------------------------------------------------

    def _response(self, link: DispatcherLink, response: dispatcher_pb2.WorkResponse) -> None:
        if response.HasField("lease"):  # the dispatchers' lease rules: renew well within it
            self._lease = min(self._lease, response.lease.ToTimedelta())
        if response.owned_changed:
            link.owned = {(p.topic, p.partition): p.epoch for p in response.owned}
        specs = []
        with self._lock:
            link.outstanding = max(0, link.outstanding - len(response.assignments))
            if link.below_high is not None:  # as the dispatcher counts it down
                lower = sum(a.task.priority != HIGH for a in response.assignments)
                link.below_high = min(link.outstanding, max(0, link.below_high - lower))
            for assignment in response.assignments:
                running = Running(assignment.attempt_id,
                                  (assignment.topic, assignment.partition), link,
                                  span=_trace_attempt(assignment), handler=assignment.handler)
                self._running[assignment.attempt_id] = running
                specs.append(_spec_of(assignment, running.span))
            if response.moved:
                moved = set(response.moved)
                for attempt_id in moved:
                    self._homeless += self._reports.pop(attempt_id, [])
            stop = [*response.stale, *response.cancel]
            for attempt_id in response.stale:
                self._running.pop(attempt_id, None)
                if self._unacked.pop(attempt_id, None) is not None:
                    log.warning("late result rejected: the task moved on (its lease ran out, "
                                "or it was cancelled)", extra={"attempt_id": attempt_id})
            for attempt_id in response.durable:
                self._unacked.pop(attempt_id, None)
        for attempt_id in stop:
            self._pool.cancel(attempt_id)
        if specs:
            try:
                self._pool.submit(specs)
            except PoolClosed:
                # Draining: whatever came in the meantime is not run here; its leases run
                # out at the owner, which retries it elsewhere.
                with self._lock:
                    for spec in specs:
                        self._running.pop(spec.attempt_id, None)
        self._wake.set()

    # --- sending ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        next_renewal = time.monotonic() + self._lease.total_seconds() / 3
        while not self._stopping.is_set():
            renew_every = self._lease.total_seconds() / 3  # the dispatchers may shorten it
            self._wake.wait(renew_every)
            time.sleep(SEND_SECONDS)
            self._wake.clear()
            renew = time.monotonic() >= next_renewal
            if renew:
                next_renewal = time.monotonic() + renew_every
            try:
                self._send(renew=renew)
            except Exception:
                log.exception("could not send to the dispatchers")

    def _owner_of(self, partition: PartitionId, fallback: DispatcherLink
                  ) -> DispatcherLink | None:
        claims = [link for link in self._links if link.connected and partition in link.owned]
        if claims:
            return max(claims, key=lambda link: link.owned[partition])
        return fallback if fallback.connected and not any(
            link.owned for link in self._links if link.connected) else None

    def _send(self, *, renew: bool) -> None:
        requests: dict[int, dispatcher_pb2.WorkRequest] = {}

        def request_for(link: DispatcherLink) -> dispatcher_pb2.WorkRequest:
            return requests.setdefault(id(link), dispatcher_pb2.WorkRequest())

        with self._lock:
            reports, self._reports = self._reports, {}
            pending = self._homeless
            self._homeless = []
            for attempt_id, items in reports.items():
                running = self._running.get(attempt_id)
                fallback = running.link if running else None
                # An end report carries the start too: a start not sent yet goes with it.
                items = [r for r in items if r.HasField("end_time")] or items
                for report in items:
                    link = self._owner_of((report.topic, report.partition),
                                          fallback or self._links[0])
                    if link is None:
                        self._homeless.append(report)
                    else:
                        request_for(link).reports.append(report)
            for report in pending:
                link = self._owner_of((report.topic, report.partition), self._links[0])
                if link is None or not link.owned:
                    self._homeless.append(report)
                else:
                    request_for(link).reports.append(report)
            if renew:
                now = time.monotonic()
                for attempt_id, (report, sent) in list(self._unacked.items()):
                    if now - sent < RESEND_SECONDS:
                        continue
                    self._unacked[attempt_id] = (report, now)
                    link = self._owner_of((report.topic, report.partition), self._links[0])
                    if link is None or not link.owned:
                        self._homeless.append(report)
                    else:
                        request_for(link).reports.append(report)
                for running in self._running.values():
                    link = self._owner_of(running.partition, running.link)
                    if link is not None:
                        request_for(link).renew.append(running.attempt_id)
                self._stop_unrenewable()
            free = 0 if self._draining else max(
                0, self._pool.capacity - self._pool.in_flight)
            for link in self._links:
                if not link.connected:
                    continue
                if self._draining:
                    request_for(link).draining = True
                    continue
                top_up = free - link.outstanding
                if top_up > 0:
                    link.outstanding += top_up
                    request_for(link).credits = top_up
                # The slots kept for HIGH are never granted to NORMAL and LOW work, so it
                # waits at the dispatchers, where a HIGH task arriving later can pass it.
                below_high = min(link.outstanding, max(0, free - self._pool.high_reserve))
                if below_high != link.below_high or id(link) in requests:
                    link.below_high = below_high
                    request_for(link).below_high_credits = below_high
        for link in self._links:
            request = requests.get(id(link))
            if request is None or not link.connected:
                continue
            # Reports carry results: a message takes what fits, the rest follow it.
            first, *later = chunks_by_size(request.reports, BATCH_BYTES)
            if later:
                del request.reports[:]
                request.reports.extend(first)
            link.send(request)
            for chunk in later:
                link.send(dispatcher_pb2.WorkRequest(reports=chunk))

    def _stop_unrenewable(self) -> None:
        """Attempts whose owner has been out of reach for a whole lease were given to another
        executor by now: stopping them keeps a task from running twice at once."""
        limit = time.monotonic() - self._lease.total_seconds()
        for attempt_id, running in list(self._running.items()):
            link = self._owner_of(running.partition, running.link)
            if link is None and running.link.disconnected_at < limit and \
                    not running.link.connected:
                del self._running[attempt_id]
                self._pool.cancel(attempt_id)

    # --- the rest --------------------------------------------------------------------------

    def load(self) -> executor_manager_pb2.GetLoadResponse:
        return executor_manager_pb2.GetLoadResponse(
            capacity=self._pool.capacity, in_flight=self._pool.in_flight,
            draining=self._draining)

    def drain(self, timeout: timedelta) -> None:
        """Takes nothing new, lets running attempts finish (up to ``timeout``) and report."""
        with self._lock:
            self._draining = True
        self._wake.set()
        self._pool.drain(timeout)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the last reports' way out
            with self._lock:
                if not self._reports and not self._homeless:
                    break
            self._wake.set()
            time.sleep(0.05)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        for link in self._links:
            link.stop()


def _trace_attempt(assignment: dispatcher_pb2.Assignment) -> Span | None:
    task = assignment.task
    return tracing.start(task.trace_context, "weir.executor.attempt", kind=SpanKind.SERVER,
                         attributes={"weir.attempt_id": assignment.attempt_id,
                                     "weir.attempt": task.attempt_number,
                                     "weir.function": task.function})


def _trace_result(running: Running, result: AttemptResult) -> None:
    """Ends the attempt's span, with the worker's run inside it as the worker reported it:
    the worker's span is recorded here, so tenant code never writes to the trace backend."""
    assert running.span is not None
    error = None if result.status is None or result.status.code == code_pb2.OK \
        else result.status.message
    if result.start_time is not None:
        tracing.record(tracing.carrier_of(running.span), "weir.handler",
                       to_nanos(result.start_time), to_nanos(result.end_time), error=error,
                       attributes={"code.function": running.handler,
                                   "weir.exit_reason": result.exit_reason},
                       service="worker")
    tracing.end_with(running.span, error=error)
    running.span = None


def to_nanos(at: datetime) -> int:
    return int(at.timestamp() * 1e9)


def _spec_of(assignment: dispatcher_pb2.Assignment, span: Span | None = None) -> AttemptSpec:
    """The attempt to run; ``span``, its span here, is the parent of the handler's."""
    task = assignment.task
    return AttemptSpec(
        attempt_id=assignment.attempt_id, tenant_id=task.tenant_id, task_id=task.task_id,
        function=task.function, handler=assignment.handler, payload=task.payload,
        attempt_number=task.attempt_number, timeout=assignment.timeout.ToTimedelta(),
        concurrency=max(1, assignment.worker_concurrency), labels=dict(task.labels),
        priority=task.priority, trace_context=tracing.carrier_of(span) if span is not None
        else dict(task.trace_context))
