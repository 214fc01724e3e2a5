"""The Cassandra layer on the real database: schema, tenants, dedup claims, tasks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from libs.cassandra.dedup import DedupStore
from libs.cassandra.migrate import applied_version, load_versions, migrate
from libs.cassandra.tenants import TenantStore, hash_api_key
from tests.helpers import unique


def test_migrations_record_the_version_and_a_second_run_applies_nothing(suite_config, cassandra):
    latest = load_versions()[-1].version
    assert applied_version(cassandra, suite_config.keyspace) == latest
    assert migrate(cassandra, keyspace=suite_config.keyspace, replication_factor=1) == []
    history = cassandra.execute(f"SELECT version FROM {suite_config.keyspace}.schema_history")
    assert sorted(r.version for r in history) == list(range(1, latest + 1))


def test_an_api_key_resolves_to_its_tenant_and_only_its_hash_is_stored(cassandra):
    store = TenantStore(cassandra)
    tenant, created = store.create_tenant(unique("acme"))
    assert created and len(tenant.webhook_secret) == 32
    again, created_again = store.create_tenant(tenant.tenant_id)
    assert not created_again and again.webhook_secret == tenant.webhook_secret

    api_key = store.issue_api_key(tenant.tenant_id)
    assert store.tenant_of(api_key) == tenant.tenant_id
    assert store.tenant_of(api_key + "x") is None
    stored = [r.key_hash for r in cassandra.execute("SELECT key_hash FROM api_keys")]
    assert hash_api_key(api_key) in stored and api_key not in stored


def test_concurrent_claims_of_one_key_grant_it_exactly_once(cassandra):
    store = DedupStore(cassandra)
    tenant, key = unique("t"), "order-42"
    with ThreadPoolExecutor(max_workers=16) as pool:
        claims = list(pool.map(
            lambda i: store.claim(tenant, key, f"task-{i}", window=timedelta(hours=1)),
            range(64)))
    winners = [c for c in claims if c.granted]
    assert len(winners) == 1
    assert {c.task_id for c in claims} == {winners[0].task_id}
    assert store.owner(tenant, key) == winners[0].task_id


def test_the_same_key_in_another_tenant_is_a_separate_claim(cassandra):
    store = DedupStore(cassandra)
    window = timedelta(minutes=5)
    assert store.claim(unique("a"), "k", "t1", window=window).granted
    assert store.claim(unique("b"), "k", "t2", window=window).granted


def test_a_claim_is_released_only_by_its_owner(cassandra):
    store = DedupStore(cassandra)
    tenant, window = unique("t"), timedelta(minutes=5)
    store.claim(tenant, "k", "owner", window=window)
    assert not store.release(tenant, "k", "intruder")
    assert store.release(tenant, "k", "owner")
    assert store.claim(tenant, "k", "next", window=window).granted


def test_a_claim_expires_with_its_window(cassandra):
    store = DedupStore(cassandra)
    tenant = unique("t")
    store.claim(tenant, "k", "t1", window=timedelta(seconds=60))
    ttl = cassandra.execute("SELECT TTL(task_id) AS ttl FROM dedup_keys "
                            "WHERE tenant_id = %s AND dedup_key = 'k'", (tenant,)).one().ttl
    assert 0 < ttl <= 60
