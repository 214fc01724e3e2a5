"""The SDK's list_functions over ListFunctions: a tenant's functions by name, every page,
and none of another tenant's."""

from __future__ import annotations

from tests.helpers import unique


def test_list_functions_pages_through_the_tenants_own_functions(suite, tenant_factory):
    _, api_key = tenant_factory()
    _, other_key = tenant_factory()
    with suite.client(api_key) as client, suite.client(other_key) as other:
        mine = {unique("listed").replace("_", "-") for _ in range(3)}
        for name in mine:
            client.create_function(name, "examples.demo:echo")
        theirs = unique("theirs").replace("_", "-")
        other.create_function(theirs, "examples.demo:echo")
        by_pages_of_two = [f.name for f in client.list_functions(page_size=2)]
        in_one_page = [f.name for f in client.list_functions()]
    assert by_pages_of_two == in_one_page == sorted(in_one_page)
    assert mine <= set(in_one_page) and theirs not in in_one_page
