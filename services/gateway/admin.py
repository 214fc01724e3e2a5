"""Tenant administration (the operator's):

    python -m services.gateway.admin ensure-tenant NAME --key-file F [--demo-functions]
    python -m services.gateway.admin set-tenant-limits NAME [--max-dispatches-per-second R]
        [--max-burst-size B] [--max-concurrent-dispatches C]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from weir.v1 import common_pb2, functions_pb2

from libs import config as weir_config
from libs.cassandra.functions import FunctionStore
from libs.cassandra.session import close, connect
from libs.cassandra.tenants import TenantStore
from libs.ratelimits import rate_limit_violations

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def ensure_tenant(store: TenantStore, tenant_id: str, key_file: Path) -> tuple[str, bool]:
    """Creates the tenant if missing and makes sure ``key_file`` holds a valid key of it.

    Returns the key and whether a new one was issued. An existing file whose key still
    resolves to the tenant is kept, so running this at every start changes nothing.

    Raises:
        ValueError: the tenant ID is not 1 to 63 characters of [a-z0-9_-].
    """
    if not TENANT_ID.fullmatch(tenant_id):
        raise ValueError(f"tenant ID {tenant_id!r}: 1 to 63 characters of [a-z0-9_-], "
                         "starting with a letter or digit")
    store.create_tenant(tenant_id)
    if key_file.exists():
        existing = key_file.read_text().strip()
        if existing and store.tenant_of(existing) == tenant_id:
            return existing, False
    api_key = store.issue_api_key(tenant_id)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(api_key + "\n")
    return api_key, True


DEMO_FUNCTIONS = {"echo": "examples.demo:echo", "sleep": "examples.demo:sleep",
                  "fail": "examples.demo:fail"}
# The demo handlers are thread-safe (and sleep waits without the CPU): a worker runs several
# at once, and they travel to it in batches.
DEMO_WORKER_CONCURRENCY = 8


def ensure_demo_functions(store: FunctionStore, tenant_id: str) -> list[str]:
    """Registers the demo functions the README tour uses; returns those it created."""
    return [name for name, handler in DEMO_FUNCTIONS.items()
            if store.create(tenant_id, functions_pb2.Function(
                name=name, handler=handler, worker_concurrency=DEMO_WORKER_CONCURRENCY))]


def set_tenant_limits(store: TenantStore, tenant_id: str, limits: common_pb2.RateLimits
                      ) -> None:
    """Sets a tenant's dispatch limits over all its functions (0 = none); dispatchers apply
    them within their few-second tenant cache.

    Raises:
        ValueError: a limit out of range, or no such tenant.
    """
    problems = rate_limit_violations(limits, at="rate_limits", adaptive=False)
    if problems:
        raise ValueError("; ".join(f"{f}: {p}" for f, p in problems.items()))
    if not store.set_rate_limits(tenant_id, limits):
        raise ValueError(f"no tenant {tenant_id!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Weir tenant administration.")
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser("ensure-tenant", help="create a tenant and an API key file")
    ensure.add_argument("tenant_id")
    ensure.add_argument("--key-file", type=Path, required=True)
    ensure.add_argument("--demo-functions", action="store_true",
                        help="also register the demo functions echo, sleep and fail")
    limits = commands.add_parser(
        "set-tenant-limits", help="set a tenant's dispatch limits over all its functions "
        "(0 or absent: none)")
    limits.add_argument("tenant_id")
    limits.add_argument("--max-dispatches-per-second", type=float, default=0.0)
    limits.add_argument("--max-burst-size", type=int, default=0)
    limits.add_argument("--max-concurrent-dispatches", type=int, default=0)
    limits.add_argument("--high-reserved-fraction", type=float, default=0.0,
                        help="share of the concurrency cap kept for HIGH tasks")
    limits.add_argument("--low-max-fraction", type=float, default=0.0,
                        help="share of the concurrency cap LOW tasks hold at most")
    args = parser.parse_args()
    if not TENANT_ID.fullmatch(args.tenant_id):
        parser.error(f"tenant ID {args.tenant_id!r}: 1 to 63 characters of [a-z0-9_-]")
    session = connect(weir_config.load())
    if args.command == "set-tenant-limits":
        try:
            set_tenant_limits(TenantStore(session), args.tenant_id, common_pb2.RateLimits(
                max_dispatches_per_second=args.max_dispatches_per_second,
                max_burst_size=args.max_burst_size,
                max_concurrent_dispatches=args.max_concurrent_dispatches,
                high_reserved_fraction=args.high_reserved_fraction,
                low_max_fraction=args.low_max_fraction))
        except ValueError as exc:
            parser.error(str(exc))
        finally:
            close(session)
        print(f"tenant {args.tenant_id}: limits set")
        return
    try:
        _, issued = ensure_tenant(TenantStore(session), args.tenant_id, args.key_file)
        created = (ensure_demo_functions(FunctionStore(session), args.tenant_id)
                   if args.demo_functions else [])
    finally:
        close(session)
    print(f"tenant {args.tenant_id}: API key {'written to' if issued else 'kept in'} "
          f"{args.key_file}" + (f"; functions created: {', '.join(created)}" if created else ""))


if __name__ == "__main__":
    main()
