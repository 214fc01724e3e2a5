"""Caps on long-lived calls (WatchTask streams, WaitOperation waits): per tenant and in all,
per gateway."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

from libs.errors import ResourceExhausted

RETRY_AFTER = timedelta(seconds=1)


class StreamQuotaExceeded(ResourceExhausted):
    """RESOURCE_EXHAUSTED with RetryInfo and a QuotaFailure naming the quota."""

    def __init__(self, message: str, *, subject: str, quota: str) -> None:
        super().__init__(message, retry_after=RETRY_AFTER, reason="STREAM_QUOTA_EXCEEDED",
                         metadata={"quota": quota}, subject=subject)
        self.quota = quota


class StreamQuota:
    """Counts open streams; `open` refuses past either cap and returns the close."""

    def __init__(self, *, per_tenant: int, total: int) -> None:
        self._per_tenant = per_tenant
        self._total = total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def open(self, tenant_id: str) -> Callable[[], None]:
        """Takes a stream for the tenant; call the returned function once it ends.

        Raises:
            StreamQuotaExceeded: the tenant, or the gateway, holds its most streams.
        """
        with self._lock:
            if self._open[tenant_id] >= self._per_tenant:
                raise StreamQuotaExceeded(
                    f"this tenant has {self._per_tenant} WatchTask streams and WaitOperation "
                    "calls open on this gateway, its most", subject=f"tenant:{tenant_id}",
                    quota="max_streams_per_tenant")
            if self._open.total() >= self._total:
                raise StreamQuotaExceeded(
                    f"this gateway serves {self._total} WatchTask streams and WaitOperation "
                    "calls, its most",
                    subject="gateway", quota="max_streams")
            self._open[tenant_id] += 1
        closed = threading.Event()

        def close() -> None:
            with self._lock:
                if not closed.is_set():
                    closed.set()
                    self._open[tenant_id] -= 1
                    if self._open[tenant_id] <= 0:
                        del self._open[tenant_id]

        return close

    def count(self, tenant_id: str | None = None) -> int:
        with self._lock:
            return self._open.total() if tenant_id is None else self._open[tenant_id]
