"""Session-wide fixtures: the real engines, started once, and per-test isolation by name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from libs import config as weir_config
from libs.cassandra.migrate import migrate
from libs.cassandra.session import close, connect
from libs.kafka.topics import ensure_topics, weir_topics
from tests.helpers import unique

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def engines() -> weir_config.WeirConfig:
    """Kafka and Cassandra are up (started if needed; `make test` stops them afterwards)."""
    subprocess.run([ROOT / "deploy/local/engines.sh", "start", "all"], check=True)
    return weir_config.load()


@pytest.fixture(scope="session")
def suite_config(engines: weir_config.WeirConfig) -> weir_config.WeirConfig:
    """A keyspace and topics of the session's own, migrated and created once."""
    config = weir_config.load(keyspace=unique("test"),
                              topic_prefix=unique("test").replace("_", "-"), task_partitions=4,
                              isolated_partitions=2)
    session = connect(config, keyspace="")
    try:
        migrate(session, keyspace=config.keyspace, replication_factor=1)
    finally:
        close(session)
    ensure_topics(bootstrap=config.kafka_bootstrap, specs=weir_topics(config),
                  replication_factor=1)
    yield config
    session = connect(config, keyspace="")
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {config.keyspace}", timeout=60)
    finally:
        close(session)


@pytest.fixture(scope="session")
def cassandra(suite_config: weir_config.WeirConfig):
    """One Cassandra session on the test keyspace, shared by the whole test session."""
    session = connect(suite_config)
    yield session
    close(session)


@pytest.fixture(scope="session")
def suite(suite_config, tmp_path_factory):
    """The five services running as processes against the session's keyspace and topics."""
    from tests.suite import Suite

    running = Suite(config=suite_config, log_dir=tmp_path_factory.mktemp("service-logs"),
                    credentials_dir=tmp_path_factory.mktemp("credentials"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def tenant_factory(cassandra):
    """Makes fresh tenants with the demo functions; each call returns (tenant_id, api_key)."""
    from libs.cassandra.functions import FunctionStore
    from libs.cassandra.tenants import TenantStore
    from services.gateway.admin import ensure_demo_functions

    tenants, functions = TenantStore(cassandra), FunctionStore(cassandra)

    def make() -> tuple[str, str]:
        created, _ = tenants.create_tenant(unique("tenant"))
        ensure_demo_functions(functions, created.tenant_id)
        return created.tenant_id, tenants.issue_api_key(created.tenant_id)

    return make


@pytest.fixture
def tenant(tenant_factory) -> tuple[str, str]:
    """A fresh tenant with the demo functions: (tenant_id, api_key)."""
    return tenant_factory()
