"""Weir's one declared configuration.

Every tunable is a field of `WeirConfig` with its default and a description; the
environment overrides any of them as ``WEIR_<FIELD NAME IN UPPER CASE>``. All five
services read the same declaration, so an operator sets a value once for the whole suite.
Values are parsed and validated at start-up: a bad setting stops the process with a message
naming every offending variable, instead of failing later mid-request.

``python -m libs.config`` prints every setting, its current value and its description.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "WEIR_"


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists each of them."""


def setting(default: Any, description: str, *, check: Callable[[Any], bool] | None = None,
            rule: str = "") -> Any:
    """Declares one tunable: its default, what it means and, optionally, a validity check."""
    return field(default=default,
                 metadata={"description": description, "check": check, "rule": rule})


def _positive(value: Any) -> bool:
    return value > 0


def _port(value: int) -> bool:
    return 0 <= value <= 65535


@dataclass(frozen=True, kw_only=True)
class WeirConfig:
    """Settings of the Weir suite. Field names are the environment keys without the prefix."""

    # Engines.
    kafka_bootstrap: str = setting(
        "127.0.0.1:9092", "Kafka bootstrap servers, comma-separated host:port.")
    cassandra_hosts: str = setting("127.0.0.1", "Cassandra contact points, comma-separated.")
    cassandra_port: int = setting(9042, "Cassandra native protocol port.", check=_port,
                                  rule="0..65535")
    keyspace: str = setting("weir", "Cassandra keyspace holding Weir's tables.",
                            check=lambda v: v.isidentifier() and v.islower(),
                            rule="a lower-case identifier")
    replication_factor: int = setting(
        1, "Replication factor for the keyspace and topics Weir creates (3 in production).",
        check=_positive, rule="> 0")
    topic_prefix: str = setting("weir", "Prefix of every Kafka topic Weir creates.",
                                check=lambda v: bool(v) and v.replace("-", "").isalnum(),
                                rule="letters, digits and dashes")
    task_partitions: int = setting(
        16, "Partitions per task topic (one topic per priority tier); shards draw from these.",
        check=_positive, rule="> 0")

    shard_size: int = setting(
        2, "Partitions in each (tenant, function)'s shuffle shard (k of the task partitions).",
        check=_positive, rule="> 0")
    isolated_partitions: int = setting(
        4, "Partitions each task topic has beyond task_partitions, in no shuffle shard: hot "
        "tenants are moved onto shard_size of them each, while there are free ones.",
        check=lambda v: v >= 0, rule=">= 0")
    hot_tenant_backlog: int = setting(
        1000, "Tasks waiting for a tenant (all its functions) past which, held for "
        "hot_tenant_seconds, the router moves it to partitions of its own.",
        check=_positive, rule="> 0")
    hot_tenant_drained: int = setting(
        100, "Tasks waiting under which, held for hot_tenant_seconds, a moved tenant goes "
        "back to its shared partitions.", check=lambda v: v >= 0, rule=">= 0")
    hot_tenant_seconds: float = setting(
        10.0, "How long a tenant's backlog stays past hot_tenant_backlog (or under "
        "hot_tenant_drained) before it is moved (or back).", check=_positive, rule="> 0")

    # Service addresses. Every service binds host:port; 0 asks the OS for a free port.
    gateway_bind_host: str = setting(
        "127.0.0.1", "Interface the gateway (the public API, plaintext) listens on.")
    internal_bind_host: str = setting(
        "127.0.0.1", "Interface the internal services (router, dispatcher, executor-manager, "
        "notifier; mutual TLS only) listen on.")
    gateway_port: int = setting(50051, "Gateway (public weir.v1 API) port.", check=_port,
                                rule="0..65535")
    router_port: int = setting(50052, "Router port.", check=_port, rule="0..65535")
    dispatcher_port: int = setting(50053, "Dispatcher port.", check=_port, rule="0..65535")
    executor_manager_port: int = setting(50054, "Executor-manager port.", check=_port,
                                         rule="0..65535")
    notifier_port: int = setting(50055, "Notifier port.", check=_port, rule="0..65535")

    # Prometheus metrics: plain HTTP on the internal bind host (docs/metrics.md).
    metrics_enabled: bool = setting(
        True, "Serve Prometheus metrics (each service on its *_metrics_port, on "
        "internal_bind_host).")
    metrics_tls: bool = setting(
        False, "Serve metrics over HTTPS with the service's certificate, only to clients "
        "with a certificate of the deployment CA (e.g. the operator's): set it when "
        "internal_bind_host is more than loopback.")
    gateway_metrics_port: int = setting(9464, "Gateway metrics port (0: a free port).",
                                        check=_port, rule="0..65535")
    router_metrics_port: int = setting(9465, "Router metrics port (0: a free port).",
                                       check=_port, rule="0..65535")
    dispatcher_metrics_port: int = setting(9466, "Dispatcher metrics port (0: a free port).",
                                           check=_port, rule="0..65535")
    executor_manager_metrics_port: int = setting(
        9467, "Executor-manager metrics port (0: a free port).", check=_port, rule="0..65535")
    notifier_metrics_port: int = setting(9468, "Notifier metrics port (0: a free port).",
                                         check=_port, rule="0..65535")
    metrics_max_tenant_labels: int = setting(
        200, "Distinct (tenant, function) label pairs a process gives metrics, first come; "
        "later pairs are counted under tenant=\"other\", function=\"other\".",
        check=lambda v: v >= 0, rule=">= 0")

    router_address: str = setting(
        "127.0.0.1:50052", "Where gateways and dispatchers reach the router (one router: it "
        "holds the dispatchers' shares of the cluster-wide limits).")
    dispatcher_addresses: str = setting(
        "127.0.0.1:50053", "Dispatchers an executor-manager takes work from (one Work stream "
        "to each), comma-separated.")
    notifier_address: str = setting("127.0.0.1:50055", "Where gateways reach a notifier.")
    executor_id: str = setting("", "This executor-manager's stable ID; empty means host:port.")
    advertise_host: str = setting("127.0.0.1",
                                  "Host other services use to reach this process.")

    # Pipeline behaviour.
    max_payload_bytes: int = setting(1 << 20, "Largest task payload the gateway accepts.",
                                     check=_positive, rule="> 0")
    max_request_bytes: int = setting(
        4 << 20, "Largest request message the gateway accepts: a larger one, up to 4 times "
        "this, is INVALID_ARGUMENT naming the limit; beyond that grpc's transport refuses it "
        "(RESOURCE_EXHAUSTED without RetryInfo).", check=_positive, rule="> 0")
    worker_processes: int = setting(4, "Worker processes per executor-manager.",
                                    check=_positive, rule="> 0")
    worker_slots: int = setting(
        8, "Attempts one worker process runs at once (threads); a function's "
        "worker_concurrency caps its own attempts in a process below this.",
        check=_positive, rule="> 0")
    lease_seconds: float = setting(
        30.0, "How long a dispatch lease lasts unless renewed (dispatchers tell their "
        "executors); a dead executor's attempts are retried about this long after its last "
        "renewal.", check=_positive, rule="> 0")
    executor_high_reserve: float = setting(
        0.1, "Share of an executor-manager's slots kept free for HIGH tasks (rounded down): "
        "NORMAL and LOW attempts never take them, so HIGH work starts at once even behind a "
        "backlog of the others.", check=lambda v: 0 <= v < 1, rule="0 <= share < 1")
    normal_min_share: float = setting(
        0.2, "Least share of a dispatcher's dispatches NORMAL tasks get while HIGH ones wait "
        "too (HIGH takes the rest).", check=lambda v: 0 <= v < 0.5, rule="0 <= share < 0.5")
    low_min_share: float = setting(
        0.1, "Least share of a dispatcher's dispatches LOW tasks get while higher tiers wait "
        "too, so bulk work never starves.", check=lambda v: 0 <= v < 0.5,
        rule="0 <= share < 0.5")
    admission_backlog: int = setting(
        4000, "Tasks waiting at the dispatchers (taken from Kafka, or still unread there) past "
        "which gateways refuse the tenants sending more than their fair share of recent "
        "submissions (RESOURCE_EXHAUSTED); for the whole cluster.", check=_positive,
        rule="> 0")
    admission_tenant_backlog: int = setting(
        1500, "Tasks of one tenant waiting at the dispatchers past which gateways refuse its "
        "submissions (RESOURCE_EXHAUSTED).", check=_positive, rule="> 0")
    sweep_interval_seconds: float = setting(
        2.0, "How often the gateway's sweeper looks for stored tasks not confirmed on Kafka.",
        check=_positive, rule="> 0")
    unqueued_grace_seconds: float = setting(
        5.0, "Age after which a task still not confirmed on Kafka is queued by the sweeper.",
        check=_positive, rule="> 0")
    webhook_timeout_seconds: float = setting(5.0, "Timeout of one webhook POST.",
                                             check=_positive, rule="> 0")
    batch_items_per_second: float = setting(
        500.0, "Rate at which a batch cancel or delete works through its tasks, so one "
        "tenant's bulk change does not crowd out the others.", check=_positive, rule="> 0")
    attempt_log_max_bytes: int = setting(
        64 * 1024, "Cap of each attempt's captured output (stdout, stderr, logging), bytes of "
        "UTF-8: past it the head and the tail are kept, the middle dropped. Workers apply it "
        "and the executor-manager enforces it again.",
        check=lambda v: 1024 <= v <= 1024 * 1024, rule="1024..1048576")
    attempt_log_retention_seconds: int = setting(
        7 * 24 * 3600, "How long an attempt's captured output is kept after the attempt "
        "ended (a Cassandra TTL; the setting of the dispatcher that stored it counts).",
        check=lambda v: 1 <= v <= 630_720_000, rule="1..630720000 (20 years, Cassandra's "
        "longest TTL)")
    operation_silent_seconds: float = setting(
        10.0, "How long a long-running operation's owner may be silent before another "
        "gateway takes the operation over.", check=_positive, rule="> 0")

    # Security.
    credentials_dir: str = setting(
        ".weir/credentials", "Directory with the deployment CA, each service's certificate "
        "and key, and the page-token key (`python -m libs.tls init` creates them; relative "
        "paths are from the repository root).")
    handler_packages: str = setting(
        "examples,tests.handlers", "Packages whose @sdk.task functions may be registered as "
        "handlers, comma-separated; any other handler is refused by the API and the workers.")
    worker_user: str = setting(
        "weir-worker", "Unprivileged user the workers run as when the executor-manager runs "
        "as root (`make run` creates it).")
    worker_memory_mb: int = setting(2048, "Address-space limit of each worker process, MiB.",
                                    check=_positive, rule="> 0")
    worker_cpu_seconds: int = setting(
        3600, "CPU-time limit of each worker process, seconds; a worker is replaced before "
        "it reaches it.", check=_positive, rule="> 0")
    worker_open_files: int = setting(256, "Open-file limit of each worker process.",
                                     check=_positive, rule="> 0")
    worker_max_processes: int = setting(
        512, "Limit on processes and threads of the worker user.", check=_positive,
        rule="> 0")
    webhook_allow_private: bool = setting(
        False, "Allow webhook targets that resolve to loopback, private, link-local or other "
        "non-public addresses (local development and tests only).")
    max_streams_per_tenant: int = setting(
        16, "Long-lived calls (WatchTask streams, WaitOperation waits) one tenant may hold "
        "open at once, per gateway.",
        check=_positive, rule="> 0")
    max_streams: int = setting(1000, "Long-lived calls (WatchTask streams, WaitOperation "
                               "waits) open at once, per gateway.",
                               check=_positive, rule="> 0")

    fault: str = setting(
        "", "Test-only fault injection point, e.g. gateway.crash_after_store; empty in "
        "production.")

    # Behaviour shared by all services.
    grpc_workers: int = setting(32, "Threads serving gRPC calls per service.", check=_positive,
                                rule="> 0")
    shutdown_grace_seconds: float = setting(
        10.0, "On SIGTERM, how long in-flight calls may finish before they are cancelled.",
        check=lambda v: v >= 0, rule=">= 0")
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.",
                             check=lambda v: v in {"DEBUG", "INFO", "WARNING", "ERROR"},
                             rule="DEBUG|INFO|WARNING|ERROR")
    api_key_cache_seconds: float = setting(
        30.0, "How long the gateway trusts a resolved API key before asking Cassandra again.",
        check=lambda v: v >= 0, rule=">= 0")

    # Tracing.
    otlp_endpoint: str = setting(
        "", "OTLP/gRPC endpoint (host:port) spans are exported to, e.g. Jaeger's "
        "127.0.0.1:4317; empty: no export (trace ids are still made, carried and logged).")
    trace_sample_ratio: float = setting(
        0.01, "Share of new traces recorded; a task whose caller sent a sampled "
        "`traceparent` is always recorded, an unsampled one never (parent-based).",
        check=lambda v: 0.0 <= v <= 1.0, rule="0..1")

    def port_of(self, service: str) -> int:
        """The configured port of a service by its package name (e.g. ``executor_manager``)."""
        return getattr(self, f"{service}_port")

    def metrics_port_of(self, service: str) -> int:
        """The configured metrics port of a service by its package name."""
        return getattr(self, f"{service}_metrics_port")

    @property
    def cassandra_contact_points(self) -> list[str]:
        return [h.strip() for h in self.cassandra_hosts.split(",") if h.strip()]


def _parse(raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true or false")
    return kind(raw.strip())


def load(env: Mapping[str, str] | None = None, **overrides: Any) -> WeirConfig:
    """Builds the config from defaults, then the environment, then explicit overrides.

    Raises:
        ConfigError: naming every variable that does not parse or breaks its rule.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    problems: list[str] = []
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    for f in dataclasses.fields(WeirConfig):
        key = ENV_PREFIX + f.name.upper()
        kind = kinds[f.type if isinstance(f.type, str) else f.type.__name__]
        if f.name in overrides:
            value = overrides.pop(f.name)
        elif key in env:
            try:
                value = _parse(env[key], kind)
            except ValueError as exc:
                problems.append(f"{key}={env[key]!r}: {exc}")
                continue
        else:
            value = f.default
        check = f.metadata["check"]
        if check is not None and not check(value):
            problems.append(f"{key}={value!r}: must be {f.metadata['rule']}")
            continue
        values[f.name] = value
    if overrides:
        problems.append(f"unknown settings: {', '.join(sorted(overrides))}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return WeirConfig(**values)


def describe(config: WeirConfig) -> str:
    """A table of every setting with its current value and description."""
    lines = []
    width = max(len(ENV_PREFIX + f.name) for f in dataclasses.fields(WeirConfig))
    for f in dataclasses.fields(WeirConfig):
        key = ENV_PREFIX + f.name.upper()
        lines.append(f"{key:<{width}} {getattr(config, f.name)!s:<18} "
                     f"{f.metadata['description']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe(load()))
