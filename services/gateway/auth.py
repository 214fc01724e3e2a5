"""Per-tenant API keys: ``authorization: Bearer <api key>`` on every call of the public API."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from datetime import timedelta

import grpc

from libs.cassandra.tenants import hash_api_key
from libs.errors import Unauthenticated
from libs.grpcserver import OPEN_SERVICES, service_name_of, wrap_handler

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

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        """The tenant the call's key belongs to.

        Raises:
            Unauthenticated: no ``authorization`` header, not a bearer key, or an unknown key.
        """
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise Unauthenticated("missing authorization metadata: send "
                                  "'authorization: Bearer <api key>'", reason="API_KEY_MISSING")
        scheme, _, api_key = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise Unauthenticated("authorization must be 'Bearer <api key>'",
                                  reason="API_KEY_MALFORMED")
        key_hash = hash_api_key(api_key.strip())
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key_hash)
        if cached and cached[1] > now:
            return cached[0]
        tenant = self._tenant_of(api_key.strip())
        if tenant is None:
            raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")
        with self._lock:
            self._cache[key_hash] = (tenant, now + self._cache_for)
        return tenant


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call except health and reflection, and sets `current_tenant`."""

    def __init__(self, authenticator: ApiKeyAuthenticator) -> None:
        self._authenticator = authenticator

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if service_name_of(handler_call_details) in OPEN_SERVICES:
            return handler
        authenticate = self._authenticator.authenticate

        def around(behaviour, streams):
            def unary(request, context):
                token = current_tenant.set(authenticate(context.invocation_metadata()))
                try:
                    return behaviour(request, context)
                finally:
                    current_tenant.reset(token)

            def stream(request, context) -> Iterator:
                token = current_tenant.set(authenticate(context.invocation_metadata()))
                try:
                    yield from behaviour(request, context)
                finally:
                    current_tenant.reset(token)

            return stream if streams else unary

        return wrap_handler(handler, around)
