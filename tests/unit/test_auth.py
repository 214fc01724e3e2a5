from datetime import timedelta

import pytest

from libs.errors import Unauthenticated
from services.gateway.auth import ApiKeyAuthenticator
from tests.helpers import Clock


def make(keys: dict[str, str], clock: Clock, lookups: list[str]) -> ApiKeyAuthenticator:
    def tenant_of(key: str) -> str | None:
        lookups.append(key)
        return keys.get(key)
    return ApiKeyAuthenticator(tenant_of=tenant_of, cache_for=timedelta(seconds=30), clock=clock)


def test_a_bearer_key_resolves_to_its_tenant_and_is_cached_for_a_while():
    clock, lookups = Clock(), []
    auth = make({"k1": "acme"}, clock, lookups)
    assert auth.authenticate([("authorization", "Bearer k1")]) == "acme"
    assert auth.authenticate([("authorization", "bearer  k1 ")]) == "acme"
    assert lookups == ["k1"]
    clock.now = 31
    assert auth.authenticate([("authorization", "Bearer k1")]) == "acme"
    assert lookups == ["k1", "k1"]


@pytest.mark.parametrize("metadata, reason", [
    ([], "API_KEY_MISSING"),
    ([("authorization", "Basic k1")], "API_KEY_MALFORMED"),
    ([("authorization", "Bearer ")], "API_KEY_MALFORMED"),
    ([("authorization", "Bearer nope")], "API_KEY_INVALID"),
])
def test_missing_malformed_or_unknown_keys_are_unauthenticated(metadata, reason):
    auth = make({"k1": "acme"}, Clock(), [])
    with pytest.raises(Unauthenticated) as raised:
        auth.authenticate(metadata)
    assert raised.value.reason == reason


def test_unknown_keys_are_not_cached_so_a_new_key_works_at_once():
    keys, lookups = {}, []
    auth = make(keys, Clock(), lookups)
    with pytest.raises(Unauthenticated):
        auth.authenticate([("authorization", "Bearer k2")])
    keys["k2"] = "beta"
    assert auth.authenticate([("authorization", "Bearer k2")]) == "beta"
