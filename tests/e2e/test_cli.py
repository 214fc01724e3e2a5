"""The `weir` command line through its installed console script, against the running suite."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import eventually
from tests.suite import ROOT

WEIR = ROOT / ".venv/bin/weir"


@pytest.fixture
def weir(suite, tenant, tmp_path):
    """Runs `weir ARGS...` as the tenant, from a folder without a key file; returns the
    completed process (text output)."""
    env = {**os.environ, "WEIR_ADDRESS": suite.address("gateway"), "WEIR_API_KEY": tenant[1]}

    def run(*args: str, env_overrides: dict[str, str] | None = None, cwd: Path = tmp_path,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(WEIR), *args], env={**env, **(env_overrides or {})},
                              cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)

    return run


def as_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_create_with_wait_returns_the_finished_task_and_get_shows_its_timeline(weir):
    task = as_json(weir("tasks", "create", "echo", "--data", "hello", "--wait", "-o", "json"))
    assert task["state"] == "TASK_STATE_SUCCEEDED" and task["result"] == "aGVsbG8="  # hello

    shown = weir("tasks", "get", task["task_id"])
    assert shown.returncode == 0, shown.stderr
    assert "hello" in shown.stdout and "timeline" in shown.stdout
    for state in ("QUEUED", "DISPATCHED", "RUNNING", "SUCCEEDED"):
        assert state in shown.stdout, shown.stdout


def test_a_failed_task_waited_for_exits_1(weir):
    failed = weir("tasks", "create", "fail", "--data", "boom", "--wait", "-o", "json")
    assert failed.returncode == 1
    task = json.loads(failed.stdout)
    assert task["state"] == "TASK_STATE_FAILED" and task["last_status"]["message"] == "boom"


def test_watch_streams_each_state_change_until_the_final_one(weir):
    task = as_json(weir("tasks", "create", "sleep", "--data", "300", "-o", "json"))
    watched = weir("tasks", "watch", task["task_id"], "-o", "json")
    assert watched.returncode == 0, watched.stderr
    states = [json.loads(line)["stage"]["state"] for line in watched.stdout.splitlines()]
    assert "TASK_STATE_RUNNING" in states and states[-1] == "TASK_STATE_SUCCEEDED", states

    table = weir("tasks", "watch", task["task_id"])  # already final: its one last change
    assert table.returncode == 0 and "SUCCEEDED" in table.stdout, table.stdout


def test_list_with_a_filter_shows_only_the_matching_tasks(weir):
    echo = as_json(weir("tasks", "create", "echo", "--data", "x", "--wait", "-o", "json"))
    fail = json.loads(weir("tasks", "create", "fail", "--data", "y", "--wait", "-o",
                           "json").stdout)

    def listed() -> list[dict]:
        tasks = as_json(weir("tasks", "list", "--filter", 'function = "fail"', "-o", "json"))
        assert fail["task_id"] in [t["task_id"] for t in tasks]
        return tasks

    tasks = eventually(listed, message="the failed task listed")
    assert {t["function"] for t in tasks} == {"fail"}
    assert echo["task_id"] not in [t["task_id"] for t in tasks]
    limited = as_json(weir("tasks", "list", "--limit", "1", "-o", "json"))
    assert len(limited) == 1


def test_cancel_stops_a_running_task(weir):
    task = as_json(weir("tasks", "create", "sleep", "--data", "60000", "-o", "json"))
    cancelled = as_json(weir("tasks", "cancel", task["task_id"], "--reason", "not needed",
                             "-o", "json"))
    assert cancelled["state"] == "TASK_STATE_CANCELLED"
    watched = weir("tasks", "watch", task["task_id"])
    assert watched.returncode == 1 and "CANCELLED" in watched.stdout


def test_logs_show_what_each_attempt_printed_and_logged(weir):
    task = as_json(weir("tasks", "create", "sleep", "--data", "200", "--wait", "-o", "json"))
    shown = weir("tasks", "logs", task["task_id"], "--attempt", "1")
    assert shown.returncode == 0, shown.stderr
    assert "sleeping 200 ms" in shown.stdout and "slept 200 ms" in shown.stdout
    [log] = as_json(weir("tasks", "logs", task["task_id"], "-o", "json"))
    assert log["attempt_number"] == 1 and "slept 200 ms" in log["text"]


def test_a_batch_is_submitted_and_waited_for(weir):
    done = as_json(weir("tasks", "create", "echo", "--data-file", "-", "--lines", "--count",
                        "2", "--wait", "-o", "json", stdin="a\nb\nc\n"))
    assert len(done) == 6 and {t["state"] for t in done} == {"TASK_STATE_SUCCEEDED"}
    assert sorted(t["result"] for t in done) == sorted(["YQ==", "Yg==", "Yw=="] * 2)


def test_a_bad_request_shows_invalid_argument_with_the_field(weir):
    bad = weir("tasks", "list", "--filter", "function ~ nonsense")
    assert bad.returncode == 10 + 3  # INVALID_ARGUMENT
    assert "INVALID_ARGUMENT" in bad.stderr and "field filter" in bad.stderr, bad.stderr
    assert bad.stdout == ""


def test_without_an_api_key_it_says_how_to_give_one(weir, tmp_path):
    missing = weir("tasks", "list", env_overrides={"WEIR_API_KEY": ""})
    assert missing.returncode == 3
    assert "WEIR_API_KEY" in missing.stderr and ".weir/demo-api-key" in missing.stderr

    wrong = weir("tasks", "list", env_overrides={"WEIR_API_KEY": "not-a-key"})
    assert wrong.returncode == 10 + 16 and "UNAUTHENTICATED" in wrong.stderr, wrong.stderr


def test_the_key_file_of_a_checkout_is_used(weir, tenant, tmp_path):
    (tmp_path / ".weir").mkdir()
    (tmp_path / ".weir/demo-api-key").write_text(tenant[1] + "\n")
    listed = weir("tasks", "list", "-o", "json", env_overrides={"WEIR_API_KEY": ""})
    assert listed.returncode == 0, listed.stderr


def test_functions_pause_resume_and_dead_letters_redrive(weir):
    function = as_json(weir("functions", "create", "again", "examples.demo:fail",
                            "--max-attempts", "1", "-o", "json"))
    assert function["state"] == "FUNCTION_STATE_ACTIVE"
    assert as_json(weir("functions", "pause", "again", "-o", "json"))["state"] \
        == "FUNCTION_STATE_PAUSED"
    assert as_json(weir("functions", "resume", "again", "-o", "json"))["state"] \
        == "FUNCTION_STATE_ACTIVE"
    assert as_json(weir("functions", "get", "again", "-o", "json"))["handler"] \
        == "examples.demo:fail"

    failed = weir("tasks", "create", "again", "--data", "boom", "--wait", "-o", "json")
    task_id = json.loads(failed.stdout)["task_id"]
    letter = as_json(weir("dead-letters", "get", task_id, "-o", "json"))
    assert letter["function"] == "again"
    redrive = as_json(weir("dead-letters", "redrive", task_id, "--data", "fixed", "--wait",
                           "-o", "json"))
    assert redrive["state"] == "OPERATION_STATE_SUCCEEDED", redrive
    operation = as_json(weir("operations", "get", redrive["name"], "-o", "json"))
    assert operation["processed_count"] == "1"
    assert weir("operations", "wait", redrive["name"]).returncode == 0
    listed = as_json(weir("operations", "list", "-o", "json"))
    assert [op["name"] for op in listed] == [redrive["name"]]
    assert redrive["name"] in weir("operations", "list").stdout
    names = [f["name"] for f in as_json(weir("functions", "list", "-o", "json"))]
    assert "again" in names and names == sorted(names)
    assert "again" in weir("functions", "list", "--limit", "1000").stdout
