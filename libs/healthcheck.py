"""Waits until a gRPC server reports SERVING: ``python -m libs.healthcheck HOST:PORT``.

Internal services speak mutual TLS only: ``--peer router`` checks one as the operator, with
the deployment's credentials (the ``credentials_dir`` setting).
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs import config as weir_config, tls


def is_serving(address: str, service: str = "", timeout_seconds: float = 1.0, *,
               credentials: tls.Credentials | None = None, peer: str = "") -> bool:
    """One health check; False when the server is down, slow or not SERVING.

    With ``credentials``, over mutual TLS to the identity ``peer``; else plaintext.
    """
    channel = (credentials.channel(address, peer) if credentials
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_until_serving(address: str, *, timeout_seconds: float, service: str = "",
                       credentials: tls.Credentials | None = None, peer: str = "") -> None:
    """Polls the health check until SERVING; raises TimeoutError when the deadline passes."""
    deadline = time.monotonic() + timeout_seconds
    while not is_serving(address, service, credentials=credentials, peer=peer):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not SERVING after {timeout_seconds:.0f}s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--peer", choices=tls.SERVICES,
                        help="an internal service: check it over mutual TLS as the operator")
    args = parser.parse_args()
    credentials = (tls.Credentials.of(weir_config.load(), tls.OPERATOR) if args.peer
                   else None)
    try:
        wait_until_serving(args.address, timeout_seconds=args.timeout, credentials=credentials,
                           peer=args.peer or "")
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
