"""RouterService: proto in, routes and limit shares out."""

from __future__ import annotations

import math
from datetime import timedelta

import grpc
from google.protobuf.duration_pb2 import Duration
from weir.internal.router.v1 import router_pb2, router_pb2_grpc
from weir.v1 import common_pb2

from libs.errors import InvalidArgument, NotFound
from libs.ratelimits import rate_limit_violations
from services.router.backlog import Backlogs
from services.router.engine import RouteTable
from services.router.limits import Adaptive, Allocator, Demand, Limits

MAX_NAME_CHARS = 128
MAX_DISPATCHER_ID_CHARS = 256
MAX_DEMANDS = 10_000
MAX_TOPIC_CHARS = 249  # Kafka's own limit
# How long a share holds without renewal (dispatchers renew every 0.25 s). The allocator
# forgets a silent dispatcher only well after its shares ran out (`Allocator.forget_after`).
SHARE_LEASE = timedelta(seconds=2)


class RouterHandler(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, table: RouteTable, allocator: Allocator, backlogs: Backlogs) -> None:
        self._table = table
        self._allocator = allocator
        self._backlogs = backlogs

    def GetRoute(self, request: router_pb2.GetRouteRequest,
                 context: grpc.ServicerContext) -> router_pb2.Route:
        problems = _name_problems(request)
        if request.priority not in common_pb2.Priority.values():
            problems["priority"] = "unknown priority"
        if problems:
            raise InvalidArgument(problems)
        return self._table.route(request.tenant_id, request.function, request.priority)

    def ListRoutes(self, request: router_pb2.ListRoutesRequest,
                   context: grpc.ServicerContext) -> router_pb2.ListRoutesResponse:
        if not 0 < len(request.tenant_id) <= MAX_NAME_CHARS:
            raise InvalidArgument({"tenant_id": f"required; at most {MAX_NAME_CHARS} characters"})
        return router_pb2.ListRoutesResponse(routes=self._table.routes(request.tenant_id))

    def GetAdaptiveRate(self, request: router_pb2.GetAdaptiveRateRequest,
                        context: grpc.ServicerContext) -> common_pb2.AdaptiveRateState:
        problems = _name_problems(request)
        if problems:
            raise InvalidArgument(problems)
        view = self._allocator.adaptive((request.tenant_id, request.function))
        if view is None:
            raise NotFound("no adaptive rate held for this function", reason="NO_ADAPTIVE_RATE")
        state = common_pb2.AdaptiveRateState(current_dispatches_per_second=view.rate,
                                             last_decision=view.last_decision)
        if view.decision_time is not None:
            state.decision_time.FromDatetime(view.decision_time)
        return state

    def GetBacklog(self, request: router_pb2.GetBacklogRequest,
                   context: grpc.ServicerContext) -> router_pb2.Backlog:
        problems = {f: "not negative" for f in ("min_tenant_waiting", "min_partition_waiting")
                    if getattr(request, f) < 0}
        if problems:
            raise InvalidArgument(problems)
        waiting, tenants = self._backlogs.view(min_tenant_waiting=request.min_tenant_waiting)
        partitions = self._backlogs.partitions(min_waiting=request.min_partition_waiting) \
            if request.min_partition_waiting else {}
        return router_pb2.Backlog(
            waiting=waiting, route_generation=self._table.generation,
            tenants=[router_pb2.TenantBacklog(tenant_id=t, waiting=n) for t, n in tenants],
            partitions=[router_pb2.PartitionBacklog(topic=topic, partition=p, waiting=n)
                        for (topic, p), n in partitions.items()])

    def ShareLimits(self, request: router_pb2.ShareLimitsRequest,
                    context: grpc.ServicerContext) -> router_pb2.ShareLimitsResponse:
        problems = {}
        if not 0 < len(request.dispatcher_id) <= MAX_DISPATCHER_ID_CHARS:
            problems["dispatcher_id"] = f"required; at most {MAX_DISPATCHER_ID_CHARS} characters"
        if len(request.demands) > MAX_DEMANDS:
            problems["demands"] = f"at most {MAX_DEMANDS:,}"
        for n, demand in enumerate(request.demands[:MAX_DEMANDS]):
            problems.update(_demand_problems(f"demands[{n}]", demand))
            if len(problems) >= 50:
                break
        if len(request.backlogs) > MAX_DEMANDS:
            problems["backlogs"] = f"at most {MAX_DEMANDS:,}"
        for n, backlog in enumerate(request.backlogs[:MAX_DEMANDS]):
            if not 0 < len(backlog.tenant_id) <= MAX_NAME_CHARS or backlog.waiting < 0:
                problems[f"backlogs[{n}]"] = (f"a tenant_id of 1 to {MAX_NAME_CHARS} "
                                              "characters, and waiting not negative")
            if len(problems) >= 50:
                break
        if len(request.partition_backlogs) > MAX_DEMANDS:
            problems["partition_backlogs"] = f"at most {MAX_DEMANDS:,}"
        for n, partition in enumerate(request.partition_backlogs[:MAX_DEMANDS]):
            if not 0 < len(partition.topic) <= MAX_TOPIC_CHARS or partition.partition < 0 \
                    or partition.waiting < 0:
                problems[f"partition_backlogs[{n}]"] = (
                    f"a topic of 1 to {MAX_TOPIC_CHARS} characters, and partition and waiting "
                    "not negative")
            if len(problems) >= 50:
                break
        if problems:
            raise InvalidArgument(problems)
        self._backlogs.report(
            request.dispatcher_id, {b.tenant_id: b.waiting for b in request.backlogs},
            {(b.topic, b.partition): b.waiting for b in request.partition_backlogs})
        grants = self._allocator.share(request.dispatcher_id, [Demand(
            key=(d.tenant_id, d.function),
            limits=Limits(rate=d.limits.max_dispatches_per_second, burst=d.limits.max_burst_size,
                          concurrency=d.limits.max_concurrent_dispatches,
                          adaptive=adaptive_of(d.limits.adaptive) if d.function else None),
            waiting=d.waiting, out=d.out, held_rate=d.held_rate, held_slots=d.held_slots,
            ended=d.ended, throttled=min(d.throttled, d.ended))
            for d in request.demands])
        lease = Duration()
        lease.FromTimedelta(SHARE_LEASE)
        return router_pb2.ShareLimitsResponse(lease=lease, shares=[router_pb2.LimitShare(
            tenant_id=g.key[0], function=g.key[1], rate=g.rate, burst=g.burst, slots=g.slots)
            for g in grants])


def _name_problems(request: router_pb2.GetRouteRequest | router_pb2.GetAdaptiveRateRequest
                   ) -> dict[str, str]:
    return {f: f"required; at most {MAX_NAME_CHARS} characters"
            for f in ("tenant_id", "function")
            if not 0 < len(getattr(request, f)) <= MAX_NAME_CHARS}


def adaptive_of(settings: common_pb2.AdaptiveRate) -> Adaptive | None:
    """The AIMD settings with their documented defaults (weir.v1.AdaptiveRate)."""
    if not settings.enabled:
        return None
    return Adaptive(increase_per_second=settings.increase_per_second or 1.0,
                    decrease_factor=settings.decrease_factor or 0.9,
                    min_throttled_attempts=settings.min_throttled_attempts or 3,
                    min_throttled_ratio=settings.min_throttled_ratio or 0.05,
                    floor=settings.min_dispatches_per_second or 1.0)


def _demand_problems(path: str, demand: router_pb2.LimitDemand) -> dict[str, str]:
    problems = {}
    if not 0 < len(demand.tenant_id) <= MAX_NAME_CHARS:
        problems[f"{path}.tenant_id"] = f"required; at most {MAX_NAME_CHARS} characters"
    if len(demand.function) > MAX_NAME_CHARS:  # empty: the tenant's own limits
        problems[f"{path}.function"] = f"at most {MAX_NAME_CHARS} characters"
    problems.update(rate_limit_violations(demand.limits, at=f"{path}.limits",
                                          adaptive=bool(demand.function)))
    for f in ("waiting", "out", "held_slots", "ended", "throttled"):
        if getattr(demand, f) < 0:
            problems[f"{path}.{f}"] = "not negative"
    if not (math.isfinite(demand.held_rate) and demand.held_rate >= 0):
        problems[f"{path}.held_rate"] = "a finite number, not negative"
    return problems
