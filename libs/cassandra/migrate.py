"""Applies the versioned schema: ``python -m libs.cassandra.migrate``.

Each folder ``schema/vNNNN`` holds CQL files and a ``manifest.json`` (version, minimum
compatible version, description, files in order). The keyspace's ``schema_version`` table
records what is applied; running the command again applies only the newer versions, so it
is safe at every start. Statements must be idempotent (``IF NOT EXISTS``) because a crash can
stop a version half-way, and the next run repeats it whole.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cassandra.cluster import Session

from libs import config as weir_config
from libs.cassandra.session import close, connect

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).parent / "schema"


@dataclass(frozen=True)
class SchemaVersion:
    version: int
    min_compatible_version: int
    description: str
    statements: list[str]


def load_versions(schema_dir: Path = SCHEMA_DIR) -> list[SchemaVersion]:
    """Every version under ``schema_dir``, in order."""
    versions = []
    for folder in sorted(schema_dir.glob("v[0-9]*")):
        manifest = json.loads((folder / "manifest.json").read_text())
        statements = []
        for name in manifest["files"]:
            statements += split_statements((folder / name).read_text())
        versions.append(SchemaVersion(manifest["version"], manifest["min_compatible_version"],
                                      manifest["description"], statements))
    numbers = [v.version for v in versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"schema versions must run 1, 2, 3, ... without gaps: {numbers}")
    return versions


def split_statements(cql: str) -> list[str]:
    """Splits a CQL file on ``;`` after dropping ``--`` comments."""
    lines = [line.split("--", 1)[0] for line in cql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def applied_version(session: Session, keyspace: str) -> int:
    row = session.execute(f"SELECT version FROM {keyspace}.schema_version WHERE id = 'weir'").one()
    return row.version if row else 0


def migrate(session: Session, *, keyspace: str, replication_factor: int,
            versions: list[SchemaVersion] | None = None) -> list[int]:
    """Creates the keyspace if needed and applies every newer version; returns those applied."""
    versions = load_versions() if versions is None else versions
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        f"{{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}")
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_version ("
        "id text PRIMARY KEY, version int, min_compatible_version int, description text, "
        "update_time timestamp)")
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_history ("
        "version int PRIMARY KEY, description text, applied_time timestamp)")
    session.set_keyspace(keyspace)
    current = applied_version(session, keyspace)
    applied = []
    for v in versions:
        if v.version <= current:
            continue
        for statement in v.statements:
            session.execute(statement, timeout=60)
        session.execute(
            "INSERT INTO schema_history (version, description, applied_time) "
            "VALUES (%s, %s, toTimestamp(now()))", (v.version, v.description))
        session.execute(
            "INSERT INTO schema_version (id, version, min_compatible_version, description, "
            "update_time) VALUES ('weir', %s, %s, %s, toTimestamp(now()))",
            (v.version, v.min_compatible_version, v.description))
        applied.append(v.version)
        log.info("schema version applied", extra={"version": v.version, "keyspace": keyspace})
    return applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keyspace", help="keyspace to migrate (default: WEIR_KEYSPACE)")
    args = parser.parse_args()
    config = weir_config.load()
    keyspace = args.keyspace or config.keyspace
    session = connect(config, keyspace="")
    try:
        applied = migrate(session, keyspace=keyspace, replication_factor=config.replication_factor)
        version = applied_version(session, keyspace)
    finally:
        close(session)
    print(f"schema: keyspace {keyspace} at version {version}"
          + (f" (applied {', '.join(map(str, applied))})" if applied else " (up to date)"))


if __name__ == "__main__":
    main()
