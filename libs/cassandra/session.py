"""Connecting to Cassandra with the settings every Weir process shares."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cassandra import ProtocolVersion
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)
from cassandra.query import PreparedStatement

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


@dataclass(frozen=True)
class NewestFirst:
    """Pages of a tenant's listing table clustered newest first by a time column, then by a
    key ascending (dead letters, operations): each page resumes after the previous page's
    last (time, key), first among rows of that same time, then among older ones."""

    first: PreparedStatement
    same_time: PreparedStatement
    older: PreparedStatement

    @classmethod
    def prepare(cls, session: Session, select: str, *, time: str, key: str) -> NewestFirst:
        """``select``: ``SELECT <columns> FROM <table>``, keyed by ``tenant_id``."""
        mine = f"{select} WHERE tenant_id = ?"
        return cls(session.prepare(f"{mine} LIMIT ?"),
                   session.prepare(f"{mine} AND {time} = ? AND {key} > ? LIMIT ?"),
                   session.prepare(f"{mine} AND {time} < ? LIMIT ?"))

    def page(self, session: Session, tenant_id: str, *, after: tuple[datetime, str] | None,
             limit: int) -> list[Any]:
        if after is None:
            return list(session.execute(self.first, (tenant_id, limit)))
        rows = list(session.execute(self.same_time, (tenant_id, after[0], after[1], limit)))
        if len(rows) < limit:
            rows += session.execute(self.older, (tenant_id, after[0], limit - len(rows)))
        return rows
