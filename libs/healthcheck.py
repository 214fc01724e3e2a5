"""Waits until a gRPC server reports SERVING: ``python -m libs.healthcheck HOST:PORT``."""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, service: str = "", timeout_seconds: float = 1.0) -> bool:
    """One health check; False when the server is down, slow or not SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_until_serving(address: str, *, timeout_seconds: float, service: str = "") -> None:
    """Polls the health check until SERVING; raises TimeoutError when the deadline passes."""
    deadline = time.monotonic() + timeout_seconds
    while not is_serving(address, service):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not SERVING after {timeout_seconds:.0f}s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    try:
        wait_until_serving(args.address, timeout_seconds=args.timeout)
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
