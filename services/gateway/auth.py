"""Per-tenant API keys: ``authorization: Bearer <api key>`` on every call of the public API."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import grpc

from libs import logs
from libs.cassandra.tenants import hash_api_key
from libs.errors import Unauthenticated
from libs.grpcserver import OPEN_SERVICES, admitting, service_name_of, wrap_handler

# The tenant of the call being served; set by `AuthInterceptor` around each handler.
current_tenant: ContextVar[str] = ContextVar("current_tenant")


class ApiKeyAuthenticator:
    """Resolves the bearer key of a call to its tenant, caching answers for a short time."""

    def __init__(self, *, tenant_of: Callable[[str], str | None], cache_for: timedelta,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tenant_of = tenant_of
        self._cache_for = cache_for.total_seconds()
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}  # key hash -> (tenant, expiry)
        self._lock = threading.Lock()

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The tenant the call's key belongs to (may read Cassandra: call it off the loop).

        Raises:
            Unauthenticated: no ``authorization`` header, more than one, not a bearer key,
                or an unknown key.
        """
        key_hash, api_key = self.key_of(metadata)
        tenant = self.cached(key_hash)
        if tenant is not None:
            return tenant
        tenant = self._tenant_of(api_key)
        if tenant is None:
            raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")
        with self._lock:
            self._cache[key_hash] = (tenant, self._clock() + self._cache_for)
        return tenant

    def cached(self, key_hash: str) -> str | None:
        """The tenant of a key resolved within the cache time, without any I/O."""
        with self._lock:
            hit = self._cache.get(key_hash)
        return hit[0] if hit and hit[1] > self._clock() else None

    @staticmethod
    def key_of(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
        """(hash, key) of the one bearer key in the metadata."""
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise Unauthenticated("missing authorization metadata: send "
                                  "'authorization: Bearer <api key>'", reason="API_KEY_MISSING")
        if len(values) > 1:  # which one would count is a guess no caller should rely on
            raise Unauthenticated("more than one authorization header",
                                  reason="API_KEY_AMBIGUOUS")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) \
            else values[0]
        scheme, _, api_key = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise Unauthenticated("authorization must be 'Bearer <api key>'",
                                  reason="API_KEY_MALFORMED")
        return hash_api_key(api_key.strip()), api_key.strip()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call except health and reflection, and sets `current_tenant`.

    A key seen within the cache time is resolved on the event loop; any other is looked up
    in a thread, so a flood of unknown keys cannot stall the loop that serves everyone.
    """

    def __init__(self, authenticator: ApiKeyAuthenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if service_name_of(handler_call_details) in OPEN_SERVICES:
            return handler
        authenticator = self._authenticator

        async def admit(context: grpc.aio.ServicerContext) -> Callable[[], None]:
            metadata = context.invocation_metadata() or ()
            key_hash, _ = authenticator.key_of(metadata)
            # Not `cached(...) or await ...`: mypy then infers the awaited str as str | None.
            tenant = authenticator.cached(key_hash)
            if not tenant:
                tenant = await asyncio.to_thread(authenticator.authenticate, metadata)
            token = current_tenant.set(tenant)
            unbind = logs.bind(tenant=tenant)  # every line logged in the call names it

            def undo() -> None:
                unbind()
                current_tenant.reset(token)
            return undo

        return wrap_handler(handler, admitting(admit))
