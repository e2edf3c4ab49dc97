"""The scaler in the stack: a burst on one queue scales its service, and only it, up and back down.

The stack's own `scaler` service (Compose backend over the Docker socket, leader election in the
stack's Redis) runs the suite's short-window policy (scaler-test-policy.yaml, mounted by
compose.scaler-test.yaml). Everything is real: the burst is sent by `services.load` from inside
the stack, replica counts are read from `docker compose ps` and the scaler's /status, and every
task's effect from PostgreSQL. This file runs before the other stack tests (file order), which
expect one container per service: the tests here leave worker-io back at its minimum.
"""

from __future__ import annotations

import json

import pytest
from compose_project import ComposeProject, wait_until
from prometheus_client.parser import text_string_to_metric_families
from scaler_http import env_value, http, status

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

WORKERS = ["worker-default", "worker-cpu", "worker-io", "worker-priority", "worker-scheduled"]
BURST_SERVICE = "worker-io"
BURST = 300  # tasks of 0.4 s: about 15 s on one replica of 8 threads, a few s on four
BURST_DURATION_S = 0.4
MAX_CYCLES_TO_SCALE_UP = 12  # includes the few seconds `docker compose run` takes to send


def running_counts(stack: ComposeProject) -> dict[str, int]:
    """Running containers per worker service, as `docker compose ps` lists them."""
    out = stack.run("ps", "--format", "json", *WORKERS).stdout.strip()
    entries = json.loads(out) if out.startswith("[") else [json.loads(x) for x in out.splitlines()]
    counts = dict.fromkeys(WORKERS, 0)
    for entry in entries:
        if entry["State"] == "running":
            counts[entry["Service"]] += 1
    return counts


def burst_effects(stack: ComposeProject) -> tuple[int, int, int]:
    """(rows, distinct load keys, distinct hostnames) of the burst's effects in PostgreSQL."""
    ((rows, keys, hosts),) = stack.psql(
        "SELECT count(*), count(DISTINCT payload->>'key'), count(DISTINCT hostname)"
        " FROM task_effects WHERE task_name = 'tasks.io_intensive.wait'"
        " AND payload->>'key' LIKE 'load-%'"
    )
    return int(rows), int(keys), int(hosts)


def test_scaler_is_healthy_leader_and_sees_every_worker_service(stack: ComposeProject) -> None:
    code, body = http(stack, "GET", "/healthz")
    assert code == 200, body
    # The first cycles may still be settling the lease: wait for the leader's full view.
    snapshot = wait_until(
        "the scaler leads and reports one replica of each of the five worker services",
        lambda: (
            (s := status(stack))["role"] == "leader"
            and all(s["services"].get(w, {}).get("current") == 1 for w in WORKERS)
            and s
        ),
        deadline_s=60,
    )
    assert set(snapshot["services"]) == set(WORKERS)
    assert snapshot["backend"] == "compose"
    assert snapshot["errors"] == [], snapshot["errors"]
    assert running_counts(stack) == dict.fromkeys(WORKERS, 1)
    uid = stack.run("exec", "-T", "scaler", "id", "-u").stdout.strip()
    assert uid != "0", "the scaler runs as root"
    # Event-driven detection through the stack's Redis (notify-keyspace-events Kl); the scaler's
    # ACL user may not run CONFIG, so this is the detector's probe coming back as an event.
    detection = wait_until(
        "event-driven detection",
        lambda: (d := status(stack)["detection"])["mode"] == "events" and d,
        deadline_s=30,
    )
    assert detection["source"] == "redis keyspace notifications", detection
    # What `make scaler-status` runs: the table from the scaler's own state file.
    table = stack.run("exec", "-T", "scaler", "scaler", "status").stdout
    assert "role leader" in table, table
    assert "detection events (redis keyspace notifications)" in table, table
    for worker in WORKERS:
        assert worker in table, table


def test_burst_scales_only_its_service_then_drains_and_returns_to_min(
    stack: ComposeProject,
) -> None:
    start_cycle = status(stack)["cycle"]
    assert running_counts(stack) == dict.fromkeys(WORKERS, 1)
    stack.run(
        "run", "--rm", "--no-deps", "migrate", "python", "-m", "services.load",
        "--queue", "io_intensive", "--count", str(BURST), "--duration", str(BURST_DURATION_S),
    )  # fmt: skip

    samples: list[dict[str, int]] = []

    def counts() -> dict[str, int]:
        sample = running_counts(stack)
        samples.append(sample)
        return sample

    def scaled_up() -> int | None:
        snapshot = status(stack)
        io = snapshot["services"][BURST_SERVICE]
        if io["current"] and io["current"] > 1 and counts()[BURST_SERVICE] > 1:
            return int(snapshot["cycle"])
        counts()
        return None

    up_cycle = wait_until(f"{BURST_SERVICE} scales above 1 replica", scaled_up, deadline_s=45)
    assert up_cycle - start_cycle <= MAX_CYCLES_TO_SCALE_UP, (start_cycle, up_cycle)

    def drained() -> bool:
        counts()
        io = status(stack)["services"][BURST_SERVICE]
        return io["waiting"] == 0 and io["in_flight"] == 0 and burst_effects(stack)[0] == BURST

    wait_until("the backlog drains (nothing waiting or in flight, every effect written)",
               drained, deadline_s=90)  # fmt: skip

    def back_to_min() -> bool:
        c = counts()
        return c[BURST_SERVICE] == 1 and status(stack)["services"][BURST_SERVICE]["current"] == 1

    wait_until(f"{BURST_SERVICE} returns to min_replicas=1 after the down window",
               back_to_min, deadline_s=90)  # fmt: skip

    peak = max(s[BURST_SERVICE] for s in samples)
    assert 2 <= peak <= 4, f"{BURST_SERVICE} peaked at {peak}; policy max_replicas is 4"
    for other in WORKERS:
        if other != BURST_SERVICE:
            seen = {s[other] for s in samples}
            assert seen == {1}, f"{other} moved during a burst on io_intensive: {sorted(seen)}"

    # Exactly once: one effect per task sent, no key twice, and clones did part of the work.
    rows, keys, hosts = burst_effects(stack)
    assert (rows, keys) == (BURST, BURST)
    assert hosts >= 2, "every task ran on the original replica: the clones never consumed"
    assert status(stack)["services"][BURST_SERVICE]["in_flight"] == 0


def test_metrics_parse_as_prometheus_and_count_the_scale_up(stack: ComposeProject) -> None:
    code, body = http(stack, "GET", "/metrics")
    assert code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    for worker in WORKERS:
        assert samples[("scaler_replicas_current", (("service", worker),))] == 1.0, worker
    assert samples[("scaler_leader", ())] == 1.0
    ups = [
        value
        for (name, labels), value in samples.items()
        if name == "scaler_decisions_total"
        and ("service", BURST_SERVICE) in labels
        and ("action", "up") in labels
    ]
    assert sum(ups) >= 1, "no scale-up decision counted for the burst"


def test_control_is_refused_without_the_token(stack: ComposeProject) -> None:
    token = env_value(stack, "SCALER_TOKEN")
    assert len(token) >= 16, "init-env.sh generates SCALER_TOKEN"
    path = "/services/worker-default/pause"
    assert http(stack, "POST", path)[0] == 401
    assert http(stack, "POST", path, token="not-the-token-0123456789")[0] == 401
    overrides = json.loads(http(stack, "GET", "/overrides")[1])["overrides"]
    assert "worker-default" not in overrides, "a refused request changed the overrides"
    code, body = http(stack, "POST", path, token=token, body=b'{"reason": "e2e"}')
    assert code == 200, body
    wait_until(
        "the pause shows in /status",
        lambda: status(stack)["services"]["worker-default"].get("override") == "paused",
        deadline_s=20,
    )
    code, body = http(stack, "POST", "/services/worker-default/resume", token=token)
    assert code == 200, body
    wait_until(
        "the resume shows in /status",
        lambda: status(stack)["services"]["worker-default"].get("override") is None,
        deadline_s=20,
    )
    # The CLI inside the scaler's container needs no token (its environment is the credential).
    out = stack.run("exec", "-T", "scaler", "scaler", "pause", "worker-cpu", "--reason", "e2e")
    assert "worker-cpu: set" in out.stdout, out.stdout
    overrides = json.loads(http(stack, "GET", "/overrides")[1])["overrides"]
    assert set(overrides) == {"worker-cpu"}, overrides
    stack.run("exec", "-T", "scaler", "scaler", "resume", "worker-cpu")
    assert json.loads(http(stack, "GET", "/overrides")[1])["overrides"] == {}
