"""Connecting to Cassandra with the settings every Weir process shares."""

from __future__ import annotations

from cassandra import ProtocolVersion
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)

from libs.config import WeirConfig


def connect(config: WeirConfig, *, keyspace: str | None = None,
            request_timeout_seconds: float = 10.0) -> Session:
    """A session on the configured cluster, using ``keyspace`` (the config's by default).

    Pass ``keyspace=""`` for a session bound to no keyspace (the migrator creates it).
    """
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        request_timeout=request_timeout_seconds)
    cluster = Cluster(config.cassandra_contact_points, port=config.cassandra_port,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                      connect_timeout=10, protocol_version=ProtocolVersion.V5,
                      # A node back from a restart is used within seconds (the driver's
                      # default waits up to ten minutes between tries).
                      reconnection_policy=ExponentialReconnectionPolicy(0.5, 5.0))
    name = config.keyspace if keyspace is None else keyspace
    return cluster.connect(name or None)


def close(session: Session) -> None:
    session.cluster.shutdown()
