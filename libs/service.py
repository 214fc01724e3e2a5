"""The process around a service: config, logs, metrics, server, signals. Each ``__main__``
calls `run`."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from libs import config as weir_config, logs, metrics, tls, tracing
from libs.grpcserver import GrpcServer

log = logging.getLogger(__name__)


@dataclass
class Started:
    """A started service: its server, and how to stop its own work before the server stops."""

    server: GrpcServer
    drain: Callable[[], None] = field(default=lambda: None)
    close: Callable[[], None] = field(default=lambda: None)
    exit_code: int = 0  # set by work that died: the process exits with it after shutting down

    def fail(self) -> None:
        """Work this service needs has died: NOT_SERVING now, then shut down and exit 1, for
        a supervisor to restart the process."""
        self.exit_code = 1
        self.server.set_serving(False)
        os.kill(os.getpid(), signal.SIGTERM)


def run(service: str, start: Callable[[weir_config.WeirConfig], Started]) -> None:
    """Loads and validates the config (exit 2 when invalid), starts, serves until SIGTERM."""
    try:
        config = weir_config.load()
    except weir_config.ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.setup(service, config.log_level)
    tracing.setup(service, config)
    # Before the service starts: whatever serves gRPC serves its metrics too, and the
    # families the service registers as it starts are there from its first scrape.
    try:
        exporter = metrics.serve(config, service)
    except tls.MissingCredentials as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"{service}: cannot serve metrics on {config.internal_bind_host}:"
              f"{metrics.port_of(config, service)} ({exc}); set "
              f"WEIR_{service.replace('-', '_').upper()}_METRICS_PORT or "
              "WEIR_METRICS_ENABLED=false", file=sys.stderr)
        sys.exit(2)
    try:
        started = start(config)
    except tls.MissingCredentials as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("serving", extra={"port": started.server.port,
                               "metrics_port": exporter.port if exporter else None,
                               "services": started.server.names})
    try:
        started.server.serve_until_signalled(grace_seconds=config.shutdown_grace_seconds,
                                             drain=started.drain)
    finally:
        started.close()
        tracing.shutdown()
        if exporter is not None:
            exporter.stop()
    sys.exit(started.exit_code)
