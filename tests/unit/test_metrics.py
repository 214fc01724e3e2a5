"""Metrics: the tenant label cap, the cached children, the endpoint, and what the dispatcher,
gateway and notifier count (on registries of their own, without I/O)."""

from __future__ import annotations

import socket
import ssl
import threading
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from weir.storage.v1 import records_pb2
from weir.v1 import tasks_pb2

from libs import config as weir_config, tls
from libs.cassandra.taskstate import StoredTask
from libs.metrics import OTHER, Collected, PerTenant, TenantLabels, serve
from services.dispatcher.metrics import DispatcherMetrics
from services.gateway.metrics import GatewayMetrics
from tests.unit.test_owner import (
    ECHO,
    PARTITION,
    Acks,
    assignments,
    connect,
    message,
    owning,
    report as report_done,
)

State = tasks_pb2.TaskState


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the registry's samples named ``name`` whose labels include ``labels``."""
    return sum(s.value for family in registry.collect() for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def label_pairs(registry: CollectorRegistry, name: str) -> set[tuple[str, str]]:
    return {(s.labels["tenant"], s.labels["function"]) for family in registry.collect()
            for s in family.samples if s.name == name}


# --- the cap ---------------------------------------------------------------------------------

def test_the_first_pairs_are_admitted_and_every_later_one_is_other():
    labels = TenantLabels(3)
    assert [labels(f"t{i}", "f") for i in range(3)] == [("t0", "f"), ("t1", "f"), ("t2", "f")]
    assert labels("t3", "f") == (OTHER, OTHER)
    assert labels("t0", "g") == (OTHER, OTHER)  # a known tenant's new function: a new pair
    assert labels("t1", "f") == ("t1", "f")  # admitted stays admitted
    assert labels.admitted == 3


def test_a_cap_of_zero_counts_everything_as_other():
    assert TenantLabels(0)("t", "f") == (OTHER, OTHER)
    with pytest.raises(ValueError):
        TenantLabels(-1)


def test_pairs_past_the_cap_are_not_remembered():
    labels = TenantLabels(1)
    labels("t", "f")
    for i in range(10_000):
        labels(f"flood-{i}", "f")
    assert labels.admitted == 1
    assert len(labels._admitted) == 1  # memory stays at the cap under a flood


def test_threads_racing_for_the_last_places_admit_no_more_than_the_cap():
    labels = TenantLabels(50)
    start = threading.Barrier(8)
    seen: list[tuple[str, str]] = []

    def claim(thread: int) -> None:
        start.wait()
        seen.extend(labels(f"t{thread}-{i}", "f") for i in range(100))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert labels.admitted == 50
    assert len({pair for pair in seen if pair != (OTHER, OTHER)}) == 50


def test_a_family_shows_at_most_the_cap_plus_other():
    registry = CollectorRegistry()
    counter = Counter("weir_test_total", "test", ["tenant", "function"], registry=registry)
    per_tenant = PerTenant(TenantLabels(5), counter)
    for i in range(100):
        [child] = per_tenant.of(f"t{i}", "f")
        child.inc()
    pairs = label_pairs(registry, "weir_test_total")
    assert pairs == {(f"t{i}", "f") for i in range(5)} | {(OTHER, OTHER)}
    assert value(registry, "weir_test_total", tenant=OTHER) == 95
    assert value(registry, "weir_test_total") == 100
    assert len(per_tenant._children) == 6  # children cached for admitted pairs and other


def test_children_are_made_once_and_shared_by_one_labels_cap_across_families():
    registry = CollectorRegistry()
    labels = TenantLabels(1)
    a = PerTenant(labels, Counter("weir_a_total", "a", ["tenant", "function"],
                                  registry=registry))
    b = PerTenant(labels, Counter("weir_b_total", "b", ["tenant", "function"],
                                  registry=registry))
    assert a.of("t", "f") is a.of("t", "f")
    b.of("u", "g")[0].inc()  # the cap is the process's, not the family's
    a.of("t", "f")[0].inc()
    assert label_pairs(registry, "weir_a_total") == {("t", "f")}
    assert label_pairs(registry, "weir_b_total") == {(OTHER, OTHER)}


def test_count_adds_a_batch_with_one_increment_per_pair():
    registry = CollectorRegistry()
    per_tenant = PerTenant(TenantLabels(10), Counter(
        "weir_batch_total", "b", ["tenant", "function"], registry=registry))
    per_tenant.count([("t", "f")] * 3 + [("t", "g")])
    assert value(registry, "weir_batch_total", tenant="t", function="f") == 3
    assert value(registry, "weir_batch_total", tenant="t", function="g") == 1


def fetch(url: str, context: ssl.SSLContext | None = None) -> str:
    """GET ``url`` directly (never through a proxy the environment names)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    with opener.open(url, timeout=10) as response:
        return response.read().decode()


# --- the endpoint ----------------------------------------------------------------------------

def test_serve_answers_prometheus_text_on_the_internal_host_and_port_zero_picks_one():
    registry = CollectorRegistry()
    registry.register(Collected(lambda: [GaugeMetricFamily("weir_test_things", "t", value=7)]))
    config = weir_config.load(env={}, router_metrics_port=0)
    exporter = serve(config, "router", registry)
    assert exporter is not None
    try:
        assert exporter.port > 0
        text = fetch(f"http://127.0.0.1:{exporter.port}/metrics")
        [family] = text_string_to_metric_families(text)
        assert (family.name, family.type, family.samples[0].value) == (
            "weir_test_things", "gauge", 7)
    finally:
        exporter.stop()


def test_serve_uses_each_services_own_port_and_can_be_disabled():
    config = weir_config.load(env={})
    assert [config.metrics_port_of(s) for s in (
        "gateway", "router", "dispatcher", "executor_manager", "notifier")] == [
        9464, 9465, 9466, 9467, 9468]
    assert serve(weir_config.load(env={"WEIR_METRICS_ENABLED": "false"}), "router") is None


def test_with_tls_metrics_go_only_to_holders_of_a_deployment_certificate(tmp_path):
    tls.init(tmp_path)
    config = weir_config.load(env={}, credentials_dir=str(tmp_path), metrics_tls=True,
                              dispatcher_metrics_port=0)
    registry = CollectorRegistry()
    registry.register(Collected(lambda: [GaugeMetricFamily("weir_test_things", "t", value=1)]))
    exporter = serve(config, "dispatcher", registry)
    assert exporter is not None
    url = f"https://127.0.0.1:{exporter.port}/metrics"

    def client(identity: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        context.check_hostname = False  # the certificate names the service, not the address
        if identity:
            context.load_cert_chain(tmp_path / f"{identity}.pem",
                                    tmp_path / f"{identity}-key.pem")
        return context

    try:
        assert "weir_test_things 1.0" in fetch(url, client("operator"))
        with pytest.raises(OSError):  # refused in the handshake: an SSL or a URL error
            fetch(url, client(None))
        with pytest.raises(OSError):  # nor in plain HTTP
            fetch(f"http://127.0.0.1:{exporter.port}/metrics")
    finally:
        exporter.stop()


def test_tls_without_the_credentials_fails_at_start_saying_how_to_make_them(tmp_path):
    config = weir_config.load(env={}, credentials_dir=str(tmp_path / "none"),
                              metrics_tls=True, router_metrics_port=0)
    with pytest.raises(tls.MissingCredentials, match="libs.tls init"):
        serve(config, "router", CollectorRegistry())


def test_a_taken_port_fails_at_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = weir_config.load(env={}, executor_manager_metrics_port=taken.getsockname()[1])
        with pytest.raises(OSError):
            serve(config, "executor-manager", CollectorRegistry())


# --- what the services count -----------------------------------------------------------------

def test_the_gateway_counts_a_submission_by_tenant_and_function():
    registry = CollectorRegistry()
    metrics = GatewayMetrics(labels=TenantLabels(200), registry=registry)
    specs = [records_pb2.TaskSpec(tenant_id="t", task=tasks_pb2.Task(function=f))
             for f in ("echo", "echo", "sleep")]
    metrics.accepted(specs)
    assert value(registry, "weir_tasks_accepted_total", tenant="t", function="echo") == 2
    assert value(registry, "weir_tasks_accepted_total", tenant="t", function="sleep") == 1


def at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def test_outcomes_are_counted_by_state_with_their_run_times():
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(labels=TenantLabels(200), registry=registry)

    def outcome(state: int, run: float | None = None) -> records_pb2.AttemptOutcome:
        made = records_pb2.AttemptOutcome(tenant_id="t", function="f", state=state)
        if run is not None:
            made.attempt.start_time.CopyFrom(at(100.0))
            made.attempt.end_time.CopyFrom(at(100.0 + run))
        return made

    metrics.outcomes([outcome(State.TASK_STATE_SUCCEEDED, 0.002),
                      outcome(State.TASK_STATE_SUCCEEDED, 0.3),
                      outcome(State.TASK_STATE_RETRY_WAIT, 7.0),
                      outcome(State.TASK_STATE_FAILED, 0.0004),
                      outcome(State.TASK_STATE_EXPIRED),  # never ran: no run time
                      outcome(State.TASK_STATE_CANCELLED)])
    expected = {"succeeded": 2, "retried": 1, "failed": 1, "expired": 1, "cancelled": 1}
    for what, count in expected.items():
        assert value(registry, f"weir_tasks_{what}_total", tenant="t", function="f") == count
    assert value(registry, "weir_task_run_seconds_count") == 4
    assert value(registry, "weir_task_run_seconds_sum") == pytest.approx(7.3024)
    assert value(registry, "weir_task_run_seconds_bucket", le="0.001") == 1
    assert value(registry, "weir_task_run_seconds_bucket", le="0.5") == 3
    metrics.dead_lettered([StoredTask(spec=records_pb2.TaskSpec(
        tenant_id="t", task=tasks_pb2.Task(function="f")),
        state=State.TASK_STATE_FAILED, status=records_pb2.TaskStatus())])
    assert value(registry, "weir_tasks_dead_lettered_total", tenant="t", function="f") == 1


def test_the_owner_counts_a_dispatch_with_the_time_its_task_waited():
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(labels=TenantLabels(200), registry=registry)
    owner = owning(lambda: 1000.0, metrics=metrics)
    waited = message("a")  # created a second ago
    waited.create_time.FromDatetime(datetime.now(UTC) - timedelta(seconds=3))
    owner.take(PARTITION, waited, ECHO, Acks().record())
    connect(owner, credits=1)
    [assignment] = assignments(owner)
    assert value(registry, "weir_tasks_dispatched_total", tenant="t1", function="echo") == 1
    assert value(registry, "weir_task_queue_seconds_count") == 1
    assert 3 <= value(registry, "weir_task_queue_seconds_sum") < 10
    report_done(owner, assignment)
    assert value(registry, "weir_tasks_succeeded_total") == 0  # counted once flushed
    metrics.outcomes(owner.flushed(owner.collect()))
    assert value(registry, "weir_tasks_succeeded_total", tenant="t1", function="echo") == 1


def test_the_dispatchers_gauges_are_read_at_each_scrape():
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(labels=TenantLabels(200), registry=registry)

    class Owner:
        def partition_backlog(self):
            return {("p.tasks.high", 0): 2, ("p.tasks.normal", 1): 5, ("p.tasks.normal", 2): 1}

        def out(self):
            return 4

    class Unread:
        def records(self):
            return {("p.tasks.normal", 1): 30, ("p.tasks.normal", 2): 0}

    metrics.watch(owner=Owner(), unread=Unread(), priorities={
        f"p.tasks.{tier}": tier for tier in ("high", "normal", "low")})
    assert value(registry, "weir_tasks_queued", priority="high") == 2
    assert value(registry, "weir_tasks_queued", priority="normal") == 6
    assert value(registry, "weir_tasks_queued", priority="low") == 0
    assert value(registry, "weir_tasks_running") == 4
    assert value(registry, "weir_consumer_lag_records", topic="p.tasks.normal",
                 partition="1") == 30
    assert value(registry, "weir_consumer_lag_records", partition="2") == 0
