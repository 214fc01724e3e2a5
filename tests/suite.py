"""The five services as real processes, for end-to-end and interop tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from libs.config import WeirConfig
from libs.healthcheck import is_serving
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("router", "notifier", "executor_manager", "dispatcher", "gateway")


@dataclass
class RunningService:
    name: str
    address: str
    process: subprocess.Popen
    log_path: Path


@dataclass
class Suite:
    """The services of one test session, each on a free port, sharing the session's keyspace."""

    config: WeirConfig
    log_dir: Path
    services: dict[str, RunningService] = field(default_factory=dict)

    def env(self, ports: dict[str, int]) -> dict[str, str]:
        env = {**os.environ, "WEIR_KEYSPACE": self.config.keyspace,
               "WEIR_TOPIC_PREFIX": self.config.topic_prefix,
               "WEIR_TASK_PARTITIONS": str(self.config.task_partitions),
               "WEIR_SHUTDOWN_GRACE_SECONDS": "2"}
        env.update({f"WEIR_{name.upper()}_PORT": str(port) for name, port in ports.items()})
        return env

    def start(self) -> None:
        ports = {name: free_port() for name in SERVICES}
        env = self.env(ports)
        for name in SERVICES:
            log_path = self.log_dir / f"{name}.log"
            process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT,
                                       env=env, stdout=log_path.open("ab"),
                                       stderr=subprocess.STDOUT)
            self.services[name] = RunningService(name, f"127.0.0.1:{ports[name]}", process,
                                                 log_path)
        for service in self.services.values():
            deadline = time.monotonic() + 60
            while not is_serving(service.address):
                if service.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{service.name} did not start:\n"
                                       f"{service.log_path.read_text()[-3000:]}")
                time.sleep(0.1)

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

    def address(self, name: str) -> str:
        return self.services[name].address
