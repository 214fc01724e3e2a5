"""Workers as the suite runs them: unprivileged, within their limits, without settings or
secrets, and running only marked handlers of the allowed packages."""

from __future__ import annotations

import json
import os
import pwd
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from weir.v1 import common_pb2, functions_pb2, tasks_pb2

from libs import config as weir_config
from libs.cassandra.functions import FunctionStore
from tests.helpers import unique

ROOT = Path(__file__).resolve().parents[2]
State = tasks_pb2.TaskState
ErrorClass = common_pb2.ErrorClass
# What a worker's environment may hold (services/executor_manager/pool.py).
WORKER_ENVIRONMENT = {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONPATH", "PYTHONNOUSERSITE",
                      "LD_LIBRARY_PATH", "MALLOC_ARENA_MAX"}


@pytest.fixture
def services_config(suite) -> weir_config.WeirConfig:
    """The settings the suite's services run with (its environment, not this process's)."""
    return weir_config.load(env=suite.env())


def secret_paths(config: weir_config.WeirConfig) -> list[str]:
    """Directories and files holding secrets or tenants' data, as this (test) process sees
    them: the repository's .weir and .var, the credentials directory, and what is in them."""
    credentials = Path(config.credentials_dir)
    directories = [ROOT / ".weir", ROOT / ".var",
                   credentials if credentials.is_absolute() else ROOT / credentials]
    paths = [str(d) for d in directories]
    for directory in directories:
        if directory.is_dir():
            paths += [str(p) for p in sorted(directory.rglob("*"))[:50] if p.is_file()]
    return paths


@pytest.fixture
def marker() -> Iterator[Path]:
    """A file a refused handler would create if it ran (in /tmp, writable by any user)."""
    path = Path(tempfile.gettempdir()) / unique("weir-never-ran")
    yield path
    path.unlink(missing_ok=True)


def test_a_worker_runs_unprivileged_within_its_limits_and_sees_no_settings_or_secrets(
        suite, tenant, services_config):
    _, api_key = tenant
    probed = secret_paths(services_config)
    assert any(Path(p).is_file() for p in probed), "no secret file to probe"
    with suite.client(api_key) as client:
        function = unique("sandbox").replace("_", "-")
        client.create_function(function, "tests.handlers:sandbox_report")
        done = client.wait(client.create_task(function, json.dumps(probed).encode()).task_id,
                           timeout=60)
    assert done.state == State.TASK_STATE_SUCCEEDED, done.last_status
    report = json.loads(done.result)

    assert 0 not in (report["uid"], report["euid"], report["gid"], report["egid"])
    assert 0 not in report["groups"]
    if os.geteuid() == 0:  # the executor-manager is root too: it switched to the worker user
        account = pwd.getpwnam(services_config.worker_user)
        assert (report["uid"], report["gid"]) == (account.pw_uid, account.pw_gid)
        assert report["groups"] == []
        assert report["capabilities"] == 0
        assert report["no_new_privs"]

    mib = 1024 * 1024
    limits = report["limits"]
    assert limits["RLIMIT_AS"] == [services_config.worker_memory_mb * mib] * 2
    assert limits["RLIMIT_CPU"] == [services_config.worker_cpu_seconds] * 2
    assert limits["RLIMIT_NOFILE"] == [services_config.worker_open_files] * 2
    if os.geteuid() == 0:  # only the dedicated user's process count is limited
        assert limits["RLIMIT_NPROC"] == [services_config.worker_max_processes] * 2

    assert not [name for name in report["environment"] if name.startswith("WEIR_")]
    assert set(report["environment"]) <= WORKER_ENVIRONMENT

    seen = {**report["paths"], **report["own_weir"]}
    assert set(report["paths"]) == set(probed)
    assert [path for path, what in seen.items() if what["readable"]] == []


@pytest.mark.parametrize(("handler", "problem"), [
    ("subprocess:getoutput", "outside the allowed handler packages"),
    ("tests.handlers:unmarked", "is not a function marked with @sdk.task")])
def test_a_handler_the_worker_may_not_run_fails_the_task_for_good_and_never_runs(
        suite, cassandra, tenant, marker, handler, problem):
    tenant_id, api_key = tenant
    function = unique("refused").replace("_", "-")
    # Straight into the store: the API's own check must not be what stops it here.
    FunctionStore(cassandra).create(tenant_id, functions_pb2.Function(
        name=function, handler=handler, retry_config=common_pb2.RetryConfig(max_attempts=5)))
    payload = f"touch {marker}" if handler.startswith("subprocess") else str(marker)
    with suite.client(api_key) as client:
        done = client.wait(client.create_task(function, payload.encode()).task_id, timeout=60)
    assert done.state == State.TASK_STATE_FAILED
    assert problem in done.last_status.message
    assert handler in done.last_status.message
    assert [a.error_class for a in done.attempts] == [ErrorClass.ERROR_CLASS_NON_RETRYABLE]
    assert not marker.exists()
