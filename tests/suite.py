"""The five services as real processes, for end-to-end and interop tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from libs import tls
from libs.config import WeirConfig
from libs.healthcheck import is_serving
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("router", "notifier", "executor_manager", "dispatcher", "gateway")


def identity_of(name: str) -> str:
    """The TLS identity of a service (``executor_manager`` -> ``executor-manager``)."""
    return name.replace("_", "-")


@dataclass
class RunningService:
    name: str
    module: str  # the service package it runs, e.g. executor_manager
    address: str
    process: subprocess.Popen
    log_path: Path
    metrics_address: str = ""


JAEGER_OTLP = f"127.0.0.1:{os.environ.get('WEIR_JAEGER_OTLP_PORT', '4317')}"
JAEGER_API = f"http://127.0.0.1:{os.environ.get('WEIR_JAEGER_UI_PORT', '16686')}/api"


@dataclass
class Suite:
    """The services of one test session, each on a free port, sharing the session's keyspace."""

    config: WeirConfig
    log_dir: Path
    credentials_dir: Path
    services: dict[str, RunningService] = field(default_factory=dict)

    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of the suite's services: the session's keyspace and topics, short
        leases and sweeps so recovery tests finish quickly, and each other's addresses."""
        address = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        env = {**os.environ, "WEIR_KEYSPACE": self.config.keyspace,
               "WEIR_TOPIC_PREFIX": self.config.topic_prefix,
               "WEIR_TASK_PARTITIONS": str(self.config.task_partitions),
               "WEIR_ISOLATED_PARTITIONS": str(self.config.isolated_partitions),
               "WEIR_SHUTDOWN_GRACE_SECONDS": "2", "WEIR_LEASE_SECONDS": "3",
               "WEIR_SWEEP_INTERVAL_SECONDS": "0.5", "WEIR_UNQUEUED_GRACE_SECONDS": "1",
               "WEIR_OPERATION_SILENT_SECONDS": "2", "WEIR_WEBHOOK_ALLOW_PRIVATE": "true",
               # Every test makes tenants of its own: all keep their labels, so a test can
               # read its own series (the cap itself is tested on a gateway of its own).
               "WEIR_METRICS_MAX_TENANT_LABELS": "100000",
               "WEIR_ROUTER_ADDRESS": address["router"],
               "WEIR_DISPATCHER_ADDRESSES": address["dispatcher"],
               "WEIR_NOTIFIER_ADDRESS": address["notifier"],
               "WEIR_CREDENTIALS_DIR": str(self.credentials_dir),
               # The session's Jaeger (engines.sh), at the default sampling ratio.
               "WEIR_OTLP_ENDPOINT": JAEGER_OTLP}
        env.update({f"WEIR_{name.upper()}_PORT": str(port) for name, port in self.ports.items()})
        env.update({f"WEIR_{name.upper()}_METRICS_PORT": str(port)
                    for name, port in self.metrics_ports.items()})
        env.update(overrides)
        return env

    def start(self) -> None:
        tls.init(self.credentials_dir)
        self.ports = {name: free_port() for name in SERVICES}
        self.metrics_ports = {name: free_port() for name in SERVICES}
        for name in SERVICES:
            self.launch(name)
        for name in SERVICES:
            self.wait_serving(name)

    def launch(self, name: str, *, module: str = "", **env: str) -> None:
        """Starts one service process (again) on its port. ``module`` runs a second instance
        of a service under another name (e.g. a second executor-manager)."""
        log_path = self.log_dir / f"{name}.log"
        if module:
            self.ports.setdefault(name, free_port())
            self.metrics_ports.setdefault(name, free_port())
            env = {f"WEIR_{module.upper()}_PORT": str(self.ports[name]),
                   f"WEIR_{module.upper()}_METRICS_PORT": str(self.metrics_ports[name]), **env}
        process = subprocess.Popen([sys.executable, "-m", f"services.{module or name}"],
                                   cwd=ROOT, env=self.env(**env), stdout=log_path.open("ab"),
                                   stderr=subprocess.STDOUT)
        self.services[name] = RunningService(
            name, module or name, f"127.0.0.1:{self.ports[name]}", process, log_path,
            f"127.0.0.1:{self.metrics_ports[name]}")

    def wait_serving(self, name: str, timeout: float = 60) -> None:
        service = self.services[name]
        deadline = time.monotonic() + timeout
        internal = service.module != "gateway"
        while not is_serving(service.address,
                             credentials=self.credentials(tls.OPERATOR) if internal else None,
                             peer=identity_of(service.module) if internal else ""):
            if service.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{service.name} did not start:\n"
                                   f"{service.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """kill -9: no shutdown hooks, no goodbyes."""
        process = self.services[name].process
        process.send_signal(signal.SIGKILL)
        process.wait()

    def restart(self, name: str, **env: str) -> None:
        self.launch(name, **env)
        self.wait_serving(name)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process is frozen, sockets open — a zombie in the making."""
        self.services[name].process.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.services[name].process.send_signal(signal.SIGCONT)

    def terminate(self, name: str) -> int:
        """SIGTERM one service and wait for it; returns its exit code."""
        process = self.services.pop(name).process
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    def stop(self) -> dict[str, int]:
        """SIGTERM every service; returns their exit codes."""
        for service in self.services.values():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes = {}
        for service in self.services.values():
            try:
                codes[service.name] = service.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.process.kill()
                codes[service.name] = service.process.wait()
        return codes

    def client(self, api_key: str):
        from libs.sdk import Client

        return Client(self.address("gateway"), api_key=api_key, timeout=30)

    def address(self, name: str) -> str:
        return self.services[name].address

    def metrics_text(self, name: str) -> str:
        """A service's /metrics, as Prometheus scrapes it."""
        url = f"http://{self.services[name].metrics_address}/metrics"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy
        with direct.open(url, timeout=10) as response:
            return response.read().decode()

    def metrics(self, name: str) -> dict[str, list[Sample]]:
        """A service's metrics, parsed: each family's samples by family name."""
        return {family.name: family.samples
                for family in text_string_to_metric_families(self.metrics_text(name))}

    def sample(self, name: str, sample: str, **labels: str) -> float:
        """The sum of a service's samples named ``sample`` whose labels include ``labels``
        (0 when there are none): e.g. ``sample("dispatcher", "weir_tasks_succeeded_total",
        tenant=tenant_id)``."""
        return sum(s.value for samples in self.metrics(name).values() for s in samples
                   if s.name == sample and labels.items() <= s.labels.items())

    def credentials(self, identity: str) -> tls.Credentials:
        """The deployment credentials of an identity (``operator``, ``dispatcher``…)."""
        return tls.Credentials.load(self.credentials_dir, identity)

    def internal_channel(self, name: str, *, identity: str = tls.OPERATOR) -> grpc.Channel:
        """A mutual-TLS channel to an internal service, as ``identity``."""
        return self.credentials(identity).channel(self.address(name),
                                                  identity_of(self.services[name].module))
