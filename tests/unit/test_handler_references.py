"""Which handler references a worker may run: only marked functions of the allowed packages."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from libs import sdk
from libs.sdk.handlers import (
    HandlerRefused,
    handler_packages,
    handler_problem,
    load_handler,
    reference_problem,
)
from tests import handlers

ALLOWED = ("examples", "tests.handlers")
FAKE = "tests.handlers.fake"  # a module made up per test, inside an allowed package


@pytest.fixture
def fake_module() -> Iterator[types.ModuleType]:
    """``tests.handlers.fake``, importable for the length of one test."""
    module = types.ModuleType(FAKE)
    sys.modules[FAKE] = module
    yield module
    del sys.modules[FAKE]


def test_the_setting_is_split_on_commas_and_blanks_are_dropped():
    assert handler_packages(" examples , tests.handlers,,") == ("examples", "tests.handlers")
    assert handler_packages("") == ()


@pytest.mark.parametrize("reference", [
    "examples.demo:echo", "tests.handlers:flaky", "examples:anything", "examples.a.b.c:f_2"])
def test_references_inside_the_allowed_packages_pass_the_check(reference):
    assert reference_problem(reference, ALLOWED) is None


@pytest.mark.parametrize("reference", [
    "builtins:eval", "os:system", "subprocess:getoutput", "importlib:import_module",
    "examples2.demo:echo", "examplesdemo:echo", "tests:handlers", "tests.helpers:eventually",
    "tests.handlersx:flaky", "libs.sdk.handlers:task"])
def test_references_outside_the_allowed_packages_are_refused(reference):
    assert "outside the allowed handler packages" in reference_problem(reference, ALLOWED)


@pytest.mark.parametrize("reference", [
    "examples.demo:echo\n", "examples.demo:echo ", " examples.demo:echo", "examples.demo:echo:x",
    "examples..demo:echo", "examples.demo.:echo", ".examples.demo:echo", "examples.demo:",
    ":echo", "examples.demo", "examples.demo:ech-o", "examples/demo:echo", "../examples:echo",
    "examples.demo:ech\u043e", "\uff45xamples.demo:echo", "examples.demo:1echo", ""])
def test_malformed_references_are_refused_before_any_package_check(reference):
    assert "is not 'package.module:function'" in reference_problem(reference, ALLOWED)


def test_a_private_function_is_refused_even_in_an_allowed_package():
    assert "private function" in reference_problem("examples.demo:_secret", ALLOWED)
    assert "private function" in reference_problem("examples.demo:__import__", ALLOWED)


def test_nothing_is_allowed_when_no_package_is_configured():
    assert "none configured" in reference_problem("examples.demo:echo", ())


def test_a_marked_function_of_an_allowed_package_loads():
    assert handler_problem("tests.handlers:flaky", ALLOWED) is None
    assert load_handler("tests.handlers:flaky", ALLOWED) is handlers.flaky


def test_an_unmarked_function_is_refused_even_in_an_allowed_package():
    problem = handler_problem("tests.handlers:unmarked", ALLOWED)
    assert problem == "handler 'tests.handlers:unmarked' is not a function marked with @sdk.task"


@pytest.mark.parametrize("name", ["ERRORS", "json", "LIMITS"])
def test_something_that_is_not_a_function_is_refused(name):
    assert "not a function marked with @sdk.task" in handler_problem(
        f"tests.handlers:{name}", ALLOWED)


def test_a_marked_object_that_cannot_be_called_is_refused(fake_module):
    fake_module.settings = types.SimpleNamespace(__weir_handler__=True)
    assert "not a function marked" in handler_problem(f"{FAKE}:settings", ALLOWED)


def test_a_mark_that_is_merely_truthy_does_not_count(fake_module):
    def handler(payload: bytes) -> bytes:
        return payload

    handler.__weir_handler__ = "yes"  # type: ignore[attr-defined]
    fake_module.handler = handler
    assert "not a function marked" in handler_problem(f"{FAKE}:handler", ALLOWED)


def test_a_module_answering_every_attribute_does_not_pass_for_a_handler(fake_module):
    fake_module.__getattr__ = lambda name: (lambda *args: "anything")  # type: ignore
    assert "not a function marked" in handler_problem(f"{FAKE}:whatever", ALLOWED)


def test_a_module_raising_on_attribute_access_is_refused_not_crashed(fake_module):
    def explode(name: str) -> None:
        raise RuntimeError("boom")

    fake_module.__getattr__ = explode  # type: ignore[attr-defined]
    assert "has no 'whatever'" in handler_problem(f"{FAKE}:whatever", ALLOWED)


def test_a_missing_module_or_function_is_refused_with_what_is_missing():
    assert "cannot import 'examples.nowhere'" in handler_problem("examples.nowhere:f", ALLOWED)
    assert "has no 'nothing'" in handler_problem("examples.demo:nothing", ALLOWED)


def test_load_handler_raises_the_same_problem_as_handler_problem():
    for reference in ("os:system", "tests.handlers:unmarked", "examples.demo:echo\n"):
        with pytest.raises(HandlerRefused) as refused:
            load_handler(reference, ALLOWED)
        assert str(refused.value) == handler_problem(reference, ALLOWED)


def test_a_refused_module_is_never_imported():
    sys.modules.pop("antigravity", None)
    assert handler_problem("antigravity:fly", ALLOWED) is not None
    assert "antigravity" not in sys.modules  # importing it would open a web browser


def test_the_task_decorator_marks_a_function_and_returns_it_unchanged():
    def handler(payload: bytes) -> bytes:
        return payload

    assert sdk.task(handler) is handler
    assert handler.__weir_handler__ is True  # type: ignore[attr-defined]
