"""`scaler validate | plan | run | status` as an operator runs them: real processes, real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from scaler_runs import ScalerRun, start_scaler_run, stop_workers
from scaler_support import free_port, local_policy, migrate, service_app, worker_env
from support.polling import poll_until

POLICY = """
interval_s: 0.5
stale_after_s: 5
services:
  worker-io:
    queues: [io_intensive]
    min_replicas: 0
    max_replicas: 3
  worker-default:
    queues: [default]
    min_replicas: 0
    max_replicas: 2
"""


def scaler(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scaler.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def env(redis_url: str, database_url: str, key_prefix: str) -> Iterator[dict[str, str]]:
    own = f"{key_prefix}cli{uuid.uuid4().hex[:6]}:"
    yield {
        **os.environ,
        "CELERY_BROKER_URL": redis_url,
        "DATABASE_URL": database_url,
        "CELERY_KEY_PREFIX": own,
        "SCALER_KEY_PREFIX": own,  # lease and overrides of this test's own
        "SCALER_HTTP_PORT": str(free_port()),
    }
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{own}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_validate_a_good_file(policy: Path) -> None:
    result = scaler("validate", str(policy))
    assert result.returncode == 0, result.stderr
    assert f"{policy}: ok" in result.stdout and "worker-io" in result.stdout


def test_validate_a_bad_file_names_the_file_the_field_and_the_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("max_replicas: 3", "max_replicas: -1").replace("0.5", "fast"))
    result = scaler("validate", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{bad}: ") for line in lines)
    assert any("services.worker-io.max_replicas" in line and "-1" in line for line in lines)
    assert any("interval_s" in line and "fast" in line for line in lines)


def test_validate_a_missing_file_fails_naming_it(tmp_path: Path) -> None:
    result = scaler("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1 and "nope.yaml" in result.stderr


def test_plan_prints_what_it_would_do_and_why(policy: Path, env: dict[str, str]) -> None:
    result = scaler("plan", "--policy", str(policy), "--json", env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True
    assert set(plan["services"]) == {"worker-io", "worker-default"}
    io = plan["services"]["worker-io"]
    assert io["current"] == 0 and io["waiting"] == 0 and io["acted"] is False
    assert io["reasons"], "every decision says why"

    table = scaler("plan", "--policy", str(policy), env=env)
    assert table.returncode == 0, table.stderr
    assert "SERVICE" in table.stdout and "worker-io" in table.stdout and "(dry run)" in table.stdout


def test_run_writes_status_and_sighup_refuses_a_bad_policy(
    policy: Path, env: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaler.cli", "run", "--dry-run", "--policy", str(policy),
         "--state-file", str(state), "--workdir", str(tmp_path / "w")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        poll_until(state.exists, "the first status snapshot", timeout_s=30)
        status = scaler("status", "--state-file", str(state))
        assert status.returncode == 0, status.stderr
        header, *rows = status.stdout.splitlines()
        assert "backend local (dry run)" in header
        assert any(r.startswith("worker-io") for r in rows)

        policy.write_text(POLICY.replace("max_replicas: 2", "max_replicas: 0"))
        proc.send_signal(signal.SIGHUP)

        def refused() -> str | None:
            out = scaler("status", "--state-file", str(state)).stdout
            return out if "policy reload refused" in out else None

        shown = poll_until(refused, "the refused reload in status", timeout_s=30)
        assert "max_replicas" in shown and str(policy) in shown
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    decisions = [entry for entry in logs if entry.get("event") == "decision"]
    assert decisions and all("reasons" in d and "service" in d for d in decisions)
    assert any(entry.get("event") == "policy-reload-refused" for entry in logs)


def test_status_without_a_running_scaler_fails_clearly(tmp_path: Path) -> None:
    result = scaler("status", "--state-file", str(tmp_path / "none.json"))
    assert result.returncode == 1 and "none.json" in result.stderr and "not found" in result.stderr


def plan(policy: Path, env: dict[str, str]) -> dict[str, Any]:
    result = scaler("plan", "--policy", str(policy), "--json", env=env)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


def test_pause_pin_resume_unpin_reach_the_decisions(policy: Path, env: dict[str, str]) -> None:
    paused = scaler("pause", "worker-io", "--policy", str(policy), "--reason", "deploy", env=env)
    assert paused.returncode == 0, paused.stderr
    assert "worker-io: set paused by operator" in paused.stdout and "deploy" in paused.stdout
    pinned = scaler("pin", "worker-default", "2", "--policy", str(policy), "--by", "alice", env=env)
    assert pinned.returncode == 0, pinned.stderr

    services = plan(policy, env)
    io, default = services["worker-io"], services["worker-default"]
    assert io["override"] == "paused" and "paused by operator" in io["reasons"][0]
    assert default["override"] == "pinned 2" and default["desired"] == 2
    assert "pinned to 2 by operator (alice)" in default["reasons"][0]

    wrong = scaler("resume", "worker-default", "--policy", str(policy), env=env)
    assert (
        wrong.returncode == 1 and "has a pin override" in wrong.stderr and "unpin" in wrong.stderr
    )
    for verb, service in (("unpin", "worker-default"), ("resume", "worker-io")):
        undone = scaler(verb, service, "--policy", str(policy), env=env)
        assert undone.returncode == 0 and f"{service}: removed" in undone.stdout, undone.stderr
    again = scaler("resume", "worker-io", "--policy", str(policy), env=env)
    assert again.returncode == 0 and "was not paused" in again.stdout

    services = plan(policy, env)
    assert services["worker-io"]["override"] is None
    assert services["worker-default"]["desired"] == 0  # back to the policy (min 0, no work)


def test_control_errors_name_the_service_the_value_and_what_was_expected(
    policy: Path, env: dict[str, str]
) -> None:
    unknown = scaler("pause", "worker-nope", "--policy", str(policy), env=env)
    assert unknown.returncode == 1
    assert "'worker-nope'" in unknown.stderr and "worker-io" in unknown.stderr

    too_many = scaler("pin", "worker-io", "9", "--policy", str(policy), env=env)
    assert too_many.returncode == 1
    assert "[0, 3]" in too_many.stderr and "got 9" in too_many.stderr

    no_policy = scaler("pause", "worker-io", env={**env, "SCALER_POLICY": ""})
    assert no_policy.returncode != 0 and "SCALER_POLICY" in no_policy.stderr


def test_a_backend_without_what_it_needs_is_refused_naming_the_setting(
    policy: Path, env: dict[str, str]
) -> None:
    bogus = scaler("plan", "--policy", str(policy), env={**env, "SCALER_BACKEND": "kubernetes"})
    assert bogus.returncode != 0 and "SCALER_BACKEND" in bogus.stderr
    assert "'kubernetes'" in bogus.stderr and "compose" in bogus.stderr
    clean = {
        k: v for k, v in env.items() if k not in ("COMPOSE_PROJECT_NAME", "SCALER_COMPOSE_PROJECT")
    }
    no_project = scaler("plan", "--policy", str(policy), "--backend", "compose", env=clean)
    assert no_project.returncode != 0 and "--project" in no_project.stderr


STEERED = yaml.safe_dump(
    local_policy(
        {"io": ["io_intensive"], "calm": ["default"]},
        up={"stabilization_s": 0, "cooldown_s": 0.5, "max_step": 3},
        down={"stabilization_s": 30, "cooldown_s": 0.5, "max_step": 3},
    )
)


@pytest.fixture
def steered(
    tmp_path: Path, env: dict[str, str], database_url: str
) -> Iterator[tuple[ScalerRun, Path, dict[str, str]]]:
    """One `scaler run` (leader election on, as by default) with real local workers."""
    migrate(database_url)
    run_env = {**worker_env(env["CELERY_BROKER_URL"], database_url, env["CELERY_KEY_PREFIX"]),
               "SCALER_KEY_PREFIX": env["SCALER_KEY_PREFIX"]}  # fmt: skip
    policy = tmp_path / "steered.yaml"
    policy.write_text(STEERED)
    workdir = tmp_path / "workers"
    run = start_scaler_run("steered", policy, workdir, tmp_path, run_env)
    try:
        yield run, workdir, run_env
    finally:
        run.stop()
        stop_workers(workdir)


def workers_of(workdir: Path, service: str) -> int:
    return len(list(workdir.glob(f"{service}-*.pid")))


@pytest.mark.slow
def test_pause_and_pin_from_the_cli_steer_a_running_scaler(
    steered: tuple[ScalerRun, Path, dict[str, str]], tmp_path: Path
) -> None:
    run, workdir, run_env = steered
    policy = str(tmp_path / "steered.yaml")
    poll_until(
        lambda: run.service("io").get("current") == 1 and run.service("calm").get("current") == 1,
        "both services at their minimum",
    )
    for args in (("pause", "io", "--reason", "investigating"), ("pin", "calm", "2")):
        result = scaler(*args, "--policy", policy, env=run_env)
        assert result.returncode == 0, result.stderr

    app = service_app(run_env)
    try:
        for _ in range(60):  # 18 s of work for one worker: still a backlog when resumed
            app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.3})
    finally:
        app.close()

    # The pin takes calm to 2 with no work at all; the pause holds io at 1 under a burst.
    poll_until(lambda: workers_of(workdir, "calm") == 2, "calm pinned to 2 workers")
    paused = poll_until(
        lambda: (
            (row := run.service("io")).get("override") == "paused"
            and (row.get("waiting") or 0) >= 10
            and row
        ),
        "io paused with a backlog",
    )
    assert "paused by operator" in paused["reasons"][0] and "investigating" in paused["reasons"][0]
    seen_at = (run.state() or {})["cycle"]
    poll_until(lambda: (run.state() or {})["cycle"] >= seen_at + 5, "five more cycles")
    assert workers_of(workdir, "io") == 1
    held = [d for d in run.decisions("io") if d["cycle"] >= seen_at]
    assert held and all(d["action"] == "hold" and not d["acted"] for d in held)
    assert "OVERRIDE" in (table := scaler("status", "--state-file", str(run.state_file)).stdout)
    assert "paused" in table and "pinned 2" in table and "role leader" in table

    resumed = scaler("resume", "io", "--policy", policy, env=run_env)
    assert resumed.returncode == 0, resumed.stderr
    poll_until(lambda: workers_of(workdir, "io") >= 2, "io to scale up once resumed")
