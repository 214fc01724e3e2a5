"""What every benchmark shares: percentiles, a tenant of its own, and where figures go."""

from __future__ import annotations

import json
import os
import platform
import statistics
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cassandra.cluster import Session

from libs.cassandra.functions import FunctionStore
from libs.cassandra.tenants import TenantStore
from services.gateway.admin import ensure_demo_functions

RESULTS = Path(__file__).resolve().parent.parent / "bench-results"
GATEWAY = f"127.0.0.1:{os.environ.get('WEIR_GATEWAY_PORT', '50051')}"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def at(p: float) -> float:
        return round(ordered[min(int(p * len(ordered)), len(ordered) - 1)], 3)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99),
            "mean_ms": round(statistics.fmean(ordered), 3), "count": len(ordered)}


def header() -> dict:
    """The date and the machine, which every result file starts with."""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()}}


def bench_tenant(session: Session) -> tuple[str, str]:
    """A fresh tenant with the demo functions: (tenant_id, api_key)."""
    tenants = TenantStore(session)
    tenant, _ = tenants.create_tenant(f"bench-{uuid.uuid4().hex[:8]}")
    ensure_demo_functions(FunctionStore(session), tenant.tenant_id)
    return tenant.tenant_id, tenants.issue_api_key(tenant.tenant_id)


def save(name: str, result: dict) -> None:
    """Writes ``bench-results/<name>.json`` and prints it."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
