"""The Cassandra layer on the real database: schema, tenants, dedup claims, tasks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from libs.cassandra.dedup import DedupStore
from libs.cassandra.migrate import applied_version, load_versions, migrate
from libs.cassandra.tenants import TenantStore, hash_api_key
from tests.helpers import eventually, unique


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


def test_attempt_logs_are_read_back_listed_in_order_deleted_and_expire(cassandra):
    from datetime import UTC, datetime

    from libs.cassandra.attempt_logs import AttemptLogStore, AttemptLogWrite
    from libs.cassandra.taskstate import micros

    tenant, task = unique("t"), "task-1"
    store = AttemptLogStore(cassandra, retention=timedelta(days=1))
    ended = datetime.now(UTC).replace(microsecond=123000)
    stamp = micros(datetime.now(UTC))
    for number in (3, 1):  # the clustering order, not the writing order, is the listing's
        store.write(AttemptLogWrite(tenant, task, number, f"attempt {number} é\n", number == 3,
                                    100 * number, ended), timestamp=stamp).result()
    first = store.get(tenant, task, 1)
    assert first is not None and first.text == "attempt 1 é\n" and not first.truncated
    assert first.original_bytes == 100 and first.end_time == ended
    assert first.expire_time is not None and \
        timedelta(hours=23) < first.expire_time - datetime.now(UTC) <= timedelta(days=1)
    assert store.get(tenant, task, 2) is None and store.get(unique("other"), task, 1) is None
    assert [log.attempt_number for log in store.list(tenant, task, start=1, limit=10)] == [1, 3]
    assert [log.attempt_number for log in store.list(tenant, task, start=2, limit=10)] == [3]
    store.delete(tenant, task)
    assert list(store.list(tenant, task, start=1, limit=10)) == []
    # A write after the deletion, at an owner's timestamp, stays deleted (DELETE_AHEAD).
    store.write(AttemptLogWrite(tenant, task, 4, "late", False, 4, ended),
                timestamp=micros(datetime.now(UTC))).result()
    assert store.get(tenant, task, 4) is None

    short = AttemptLogStore(cassandra, retention=timedelta(seconds=1))
    short.write(AttemptLogWrite(tenant, "task-2", 1, "brief", False, 5, ended),
                timestamp=micros(datetime.now(UTC))).result()
    assert short.get(tenant, "task-2", 1) is not None
    eventually(lambda: short.get(tenant, "task-2", 1) is None, timeout=10,
               message="the log's TTL ended")


def test_an_operation_listed_for_the_runners_always_has_its_record(cassandra):
    """Before: the listing was written first, and a runner that read it in between took the
    operation for a finished one and unlisted it: it stayed PENDING for ever."""
    import threading

    from weir.storage.v1 import records_pb2

    from libs.cassandra.operations import OperationStore
    from services.gateway.operations import new_operation

    store, tenant = OperationStore(cassandra), unique("t")
    done, listed_without_record = threading.Event(), []

    def runner_view() -> None:  # what OperationRunner.poll reads, as fast as it can
        while not done.is_set():
            for key in store.active():
                if key[0] == tenant and store.get(*key) is None:
                    listed_without_record.append(key)

    reader = threading.Thread(target=runner_view)
    reader.start()
    try:
        names = []
        for _ in range(40):
            record = new_operation(tenant, records_pb2.OperationKind.OPERATION_KIND_DELETE_TASKS,
                                   "test", filter="state = TASK_STATE_FAILED", items_per_second=1)
            assert store.create(record)
            names.append(record.operation.name)
    finally:
        done.set()
        reader.join()
    assert listed_without_record == []
    assert not store.create(record), "a name is stored once"
    for name in names:
        store.deactivate(tenant, name)


def test_every_change_to_a_function_is_in_the_change_log(cassandra):
    from datetime import timedelta as span

    from weir.v1 import functions_pb2

    from libs.cassandra.functions import FunctionStore
    from libs.cassandra.taskstate import now_utc

    store, tenant, since = FunctionStore(cassandra), unique("t"), now_utc() - span(seconds=1)
    function = functions_pb2.Function(name="resize", handler="examples.demo:echo")
    assert store.create(tenant, function) and not store.create(tenant, function)
    function.description = "changed"
    assert store.update(tenant, function)
    assert store.delete(tenant, "resize") and not store.delete(tenant, "resize")
    assert not store.update(tenant, function)
    changes = store.changes(since)
    assert all(when.tzinfo is not None for when, _, _ in changes)  # comparable with now_utc()
    mine = [(t, n) for _, t, n in changes if t == tenant]
    assert mine == [(tenant, "resize")] * 3  # created, updated, deleted; not the refusals
