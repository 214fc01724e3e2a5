"""Each service's Prometheus endpoint on the real suite: it parses, and the series move as
tasks pass through (accepted, dispatched, queue and run times, slots, outcomes, webhooks);
a tenant past the label cap is counted as "other"."""

from __future__ import annotations

import json

from google.protobuf.duration_pb2 import Duration
from weir.v1 import common_pb2

from libs.sdk import Client
from tests.e2e.test_webhooks import Receiver, target
from tests.helpers import eventually, unique
from tests.suite import SERVICES

# The families each service serves (parsed names: counters without `_total`).
FAMILIES = {
    "gateway": {"weir_tasks_accepted"},
    "router": {"weir_backlog_tasks", "weir_isolated_tenants"},
    "dispatcher": {"weir_tasks_dispatched", "weir_task_queue_seconds", "weir_task_run_seconds",
                   "weir_tasks_succeeded", "weir_tasks_failed", "weir_tasks_retried",
                   "weir_tasks_expired", "weir_tasks_cancelled", "weir_tasks_dead_lettered",
                   "weir_tasks_queued", "weir_tasks_running", "weir_consumer_lag_records"},
    "executor_manager": {"weir_executor_slots", "weir_executor_slots_in_use",
                         "weir_executor_slots_reserved", "weir_executor_attempts_waiting"},
    "notifier": {"weir_webhook_deliveries", "weir_webhook_request_seconds"},
}


def test_every_service_serves_its_metrics_in_the_prometheus_format(suite):
    assert set(FAMILIES) == set(SERVICES)
    for name in SERVICES:
        families = suite.metrics(name)
        missing = FAMILIES[name] - set(families)
        assert not missing, f"{name} lacks {missing}"
        assert "process_cpu_seconds" in families  # the process collector comes along
        others = {f for f in families if f.startswith("weir_")} - FAMILIES[name]
        assert not others, f"{name} serves families of another service: {others}"
    dispatcher = suite.metrics("dispatcher")
    assert {s.labels["priority"] for s in dispatcher["weir_tasks_queued"]} == {
        "high", "normal", "low"}
    partitions = suite.config.task_partitions + suite.config.isolated_partitions
    lag = dispatcher["weir_consumer_lag_records"]
    assert len(lag) <= 3 * partitions  # one series per owned partition of the three topics
    assert all(0 <= int(s.labels["partition"]) < partitions for s in lag)


def test_a_task_moves_the_series_of_each_service_it_passes(suite, tenant):
    tenant_id, api_key = tenant
    receiver = Receiver(200)
    delivered = suite.sample("notifier", "weir_webhook_deliveries_total", outcome="delivered")
    posts = suite.sample("notifier", "weir_webhook_request_seconds_count")
    mine = {"tenant": tenant_id, "function": "sleep"}
    try:
        with suite.client(api_key) as client:
            task = client.create_task("sleep", b"1500", result_targets=[target(receiver.url)])
            # While it sleeps, it holds a slot and is out at its executor.
            eventually(lambda: suite.sample("executor_manager", "weir_executor_slots_in_use")
                       >= 1 and suite.sample("dispatcher", "weir_tasks_running") >= 1,
                       interval=0.05, timeout=30, message="the task seen running")
            client.wait(task.task_id, timeout=60)
        assert suite.sample("gateway", "weir_tasks_accepted_total", **mine) == 1
        assert suite.sample("dispatcher", "weir_tasks_dispatched_total", **mine) == 1
        assert suite.sample("dispatcher", "weir_task_queue_seconds_count", **mine) == 1
        eventually(lambda: suite.sample("dispatcher", "weir_tasks_succeeded_total", **mine)
                   == 1, message="the success counted once flushed")
        assert suite.sample("dispatcher", "weir_task_run_seconds_count", **mine) == 1
        assert 1.5 <= suite.sample("dispatcher", "weir_task_run_seconds_sum", **mine) < 10
        assert suite.sample("dispatcher", "weir_task_run_seconds_bucket", le="1.0",
                            **mine) == 0
        assert suite.sample("dispatcher", "weir_task_run_seconds_bucket", le="5.0",
                            **mine) == 1
        executor = suite.metrics("executor_manager")
        slots = executor["weir_executor_slots"][0].value
        assert slots >= 1 and 0 <= executor["weir_executor_slots_in_use"][0].value <= slots
        eventually(lambda: receiver.task_ids() == {task.task_id}, message="the webhook")
        eventually(lambda: suite.sample(
            "notifier", "weir_webhook_deliveries_total", outcome="delivered") == delivered + 1,
            message="the delivery counted")
        assert suite.sample("notifier", "weir_webhook_request_seconds_count") >= posts + 1
    finally:
        receiver.close()


def test_a_failing_task_moves_retried_failed_and_dead_lettered(suite, tenant):
    tenant_id, api_key = tenant
    function = unique("flaky").replace("_", "-")
    mine = {"tenant": tenant_id, "function": function}
    with suite.client(api_key) as client:
        client.create_function(function, "tests.handlers:flaky", retry_config=(
            common_pb2.RetryConfig(max_attempts=2, min_backoff=Duration(nanos=100_000_000))))
        task = client.create_task(function, json.dumps({"succeed_on": 99}).encode())
        client.wait(task.task_id, timeout=60)
    expected = {"weir_tasks_dispatched_total": 2, "weir_task_queue_seconds_count": 2,
                "weir_tasks_retried_total": 1, "weir_tasks_failed_total": 1,
                "weir_tasks_dead_lettered_total": 1, "weir_tasks_succeeded_total": 0,
                "weir_task_run_seconds_count": 2}
    eventually(lambda: {name: suite.sample("dispatcher", name, **mine) for name in expected}
               == expected, message="retried, failed and dead-lettered counted")
    assert suite.sample("gateway", "weir_tasks_accepted_total", **mine) == 1


def test_tenants_past_the_label_cap_are_counted_as_other(suite, tenant_factory):
    """A gateway of its own with a cap of one (tenant, function) pair: the first tenant keeps
    its labels, the second is counted under tenant="other", function="other"."""
    first, second = tenant_factory(), tenant_factory()
    suite.launch("gateway_capped", module="gateway", WEIR_METRICS_MAX_TENANT_LABELS="1")
    suite.wait_serving("gateway_capped")
    try:
        for _, api_key in (first, second, first):
            with Client(suite.address("gateway_capped"), api_key=api_key, timeout=30) as client:
                client.create_task("echo", b"x")
        accepted = suite.metrics("gateway_capped")["weir_tasks_accepted"]
        counts = {(s.labels["tenant"], s.labels["function"]): s.value for s in accepted
                  if s.name == "weir_tasks_accepted_total"}
        assert counts == {(first[0], "echo"): 2, ("other", "other"): 1}
    finally:
        suite.terminate("gateway_capped")
