"""Readiness probe for the local engines: exit 0 once the engine really answers.

    probe.py kafka HOST:PORT        a metadata request (list topics)
    probe.py cassandra HOST PORT    SELECT release_version FROM system.local
    probe.py jaeger HOST:PORT       its health check answers 200
"""

import logging
import socket
import sys


def port_open(host: str, port: int) -> None:
    """Fail fast while nothing listens yet (kafka-python would retry until its timeout)."""
    socket.create_connection((host, port), timeout=1).close()


def kafka(address: str) -> None:
    host, _, port = address.rpartition(":")
    port_open(host, int(port))
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=address, request_timeout_ms=3000,
                             bootstrap_timeout_ms=3000, client_id="weir-probe")
    try:
        admin.list_topics()
    finally:
        admin.close()


def cassandra(host: str, port: str) -> None:
    port_open(host, int(port))
    from cassandra.cluster import Cluster

    cluster = Cluster([host], port=int(port), connect_timeout=3, protocol_version=5)
    try:
        cluster.connect().execute("SELECT release_version FROM system.local", timeout=3)
    finally:
        cluster.shutdown()


def jaeger(address: str) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/status", timeout=3) as answer:
        if answer.status != 200:
            raise RuntimeError(f"health check answered {answer.status}")


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # a refused connection is the expected answer while booting
    try:
        {"kafka": kafka, "cassandra": cassandra, "jaeger": jaeger}[sys.argv[1]](*sys.argv[2:])
    except Exception as exc:  # any failure means "not ready yet"; the caller retries
        print(f"not ready: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
