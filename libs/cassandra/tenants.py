"""Tenants and their API keys. Keys are random; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cassandra.cluster import Session
from weir.v1 import common_pb2

API_KEY_PREFIX = "weir_"


def hash_api_key(api_key: str) -> str:
    """SHA-256 suffices (no slow hash needed): keys carry 256 random bits, not a password."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    display_name: str
    webhook_secret: bytes
    # Dispatch limits over all the tenant's functions together; unset fields mean none.
    rate_limits: common_pb2.RateLimits = field(default_factory=common_pb2.RateLimits)


class TenantStore:
    """Creates tenants, issues API keys and resolves a key to its tenant."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._insert_tenant = session.prepare(
            "INSERT INTO tenants (tenant_id, display_name, webhook_secret, create_time) "
            "VALUES (?, ?, ?, ?) IF NOT EXISTS")
        self._select_tenant = session.prepare(
            "SELECT tenant_id, display_name, webhook_secret, rate_limits FROM tenants "
            "WHERE tenant_id = ?")
        self._update_limits = session.prepare(
            "UPDATE tenants SET rate_limits = ? WHERE tenant_id = ? IF EXISTS")
        self._insert_key = session.prepare(
            "INSERT INTO api_keys (key_hash, tenant_id, create_time) VALUES (?, ?, ?)")
        self._select_key = session.prepare("SELECT tenant_id FROM api_keys WHERE key_hash = ?")

    def create_tenant(self, tenant_id: str, display_name: str = "") -> tuple[Tenant, bool]:
        """Creates the tenant unless it exists; returns it and whether it was created."""
        secret = secrets.token_bytes(32)
        result = self._session.execute(self._insert_tenant, (
            tenant_id, display_name or tenant_id, secret, datetime.now(UTC)))
        if result.was_applied:
            return Tenant(tenant_id, display_name or tenant_id, secret), True
        tenant = self.get_tenant(tenant_id)
        assert tenant is not None
        return tenant, False

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self._session.execute(self._select_tenant, (tenant_id,)).one()
        if row is None:
            return None
        return Tenant(row.tenant_id, row.display_name, row.webhook_secret,
                      common_pb2.RateLimits.FromString(row.rate_limits or b""))

    def set_rate_limits(self, tenant_id: str, limits: common_pb2.RateLimits) -> bool:
        """Sets the tenant's limits over all its functions; False when there is no tenant."""
        return self._session.execute(self._update_limits, (
            limits.SerializeToString(), tenant_id)).was_applied

    def issue_api_key(self, tenant_id: str) -> str:
        """A new API key for the tenant; the only time the key itself is seen."""
        api_key = new_api_key()
        self._session.execute(self._insert_key,
                              (hash_api_key(api_key), tenant_id, datetime.now(UTC)))
        return api_key

    def tenant_of(self, api_key: str) -> str | None:
        """The tenant an API key belongs to, or None for an unknown key."""
        row = self._session.execute(self._select_key, (hash_api_key(api_key),)).one()
        return row.tenant_id if row else None
