"""The whole stack, end to end: `up --wait` on the real compose files, tasks through real workers.

Runs against real containers (Redis, PostgreSQL, beat, the five worker services) built from
compose/app.Dockerfile. The tests run in file order; the last one tears the stack down and checks
that nothing of the project is left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from compose_project import ComposeProject, wait_until
from scaler_http import env_value, http, status

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

PROBE_SCRIPT = Path(__file__).with_name("probe_tasks.py")
WORKER_SERVICES = {
    "default": "worker-default",
    "cpu_intensive": "worker-cpu",
    "io_intensive": "worker-io",
    "priority": "worker-priority",
    "scheduled": "worker-scheduled",
}
APP_SERVICES = ["beat", *WORKER_SERVICES.values(), "scaler"]
LONG_RUNNING = ["redis", "postgres", *APP_SERVICES]


def ran_on(result: dict[str, Any], hostnames: set[str]) -> bool:
    """The task's result names one of the service's containers (Celery's hostname is its id)."""
    return result.get("hostname") in hostnames


def ps(stack: ComposeProject) -> dict[str, dict[str, Any]]:
    """`docker compose ps --all` as {service: entry} (one container per service here)."""
    out = stack.run("ps", "--all", "--format", "json").stdout.strip()
    # Compose prints one JSON object per line (older releases: one JSON array).
    entries = json.loads(out) if out.startswith("[") else [json.loads(x) for x in out.splitlines()]
    return {e["Service"]: e for e in entries}


def test_stack_comes_up_healthy_and_migrate_completes(stack: ComposeProject) -> None:
    services = ps(stack)
    for name in LONG_RUNNING:
        assert services[name]["State"] == "running", services[name]
        assert services[name]["Health"] == "healthy", services[name]
    assert services["migrate"]["State"] == "exited"
    assert services["migrate"]["ExitCode"] == 0
    assert "flower" not in services, "flower is behind the monitoring profile"


def test_each_queue_runs_on_its_own_service_and_leaves_its_effect(stack: ComposeProject) -> None:
    # The broker is not published: send from inside the stack, with the application's router.
    proc = stack.run("exec", "-T", "beat", "python", "-", stdin=PROBE_SCRIPT.read_text())
    results: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    assert set(results) == set(WORKER_SERVICES)

    hosts = {queue: stack.hostnames(service) for queue, service in WORKER_SERVICES.items()}
    for queue, probe in results.items():
        result = probe["result"]
        others = set().union(*(h for q, h in hosts.items() if q != queue))
        assert ran_on(result, hosts[queue]), (queue, result, hosts[queue])
        assert not ran_on(result, others)
        assert result["task_id"] == probe["task_id"]
        assert result.get("duplicate") is not True

    ids = ", ".join(f"'{p['task_id']}'" for p in results.values())
    rows = stack.psql(f"SELECT task_id, queue, hostname FROM task_effects WHERE task_id IN ({ids})")
    effects = {task_id: (queue, host) for task_id, queue, host in rows}
    for queue, probe in results.items():
        assert effects.get(probe["task_id"]) == (queue, probe["result"]["hostname"]), queue


def test_beat_enqueues_the_health_check_on_the_priority_service(stack: ComposeProject) -> None:
    priority_hosts = stack.hostnames("worker-priority")

    def health_rows() -> list[list[str]]:
        return stack.psql(
            "SELECT e.queue, e.hostname, h.healthy FROM task_effects e"
            " JOIN health_checks h USING (task_id)"
            " WHERE e.task_name = 'tasks.monitoring.health_check'"
        )

    rows = wait_until(
        "beat enqueues tasks.monitoring.health_check (every HEALTH_CHECK_INTERVAL=3 s) and the "
        "priority worker runs it",
        health_rows,
        deadline_s=60,
    )
    for queue, hostname, healthy in rows:
        assert queue == "priority"
        assert hostname in priority_hosts
        assert healthy == "t", "the health check found Redis or PostgreSQL unhealthy"


def test_no_redis_or_postgres_port_is_published(stack: ComposeProject) -> None:
    for service in ("redis", "postgres"):
        (container,) = stack.inspect(stack.container_ids(service))
        bindings = container["HostConfig"].get("PortBindings") or {}
        assert bindings == {}, (service, bindings)
        published = {p: v for p, v in (container["NetworkSettings"]["Ports"] or {}).items() if v}
        assert published == {}, (service, published)
        networks = container["NetworkSettings"]["Networks"]
        assert list(networks) == [f"{stack.name}_backend"], (service, list(networks))


def test_app_containers_are_non_root_with_init_and_scaler_labels(stack: ComposeProject) -> None:
    for service in APP_SERVICES:
        uid = stack.run("exec", "-T", service, "id", "-u").stdout.strip()
        assert uid != "0", f"{service} runs as root"
        (container,) = stack.inspect(stack.container_ids(service))
        assert container["HostConfig"]["Init"] is True, service
    for queue, service in WORKER_SERVICES.items():
        (container,) = stack.inspect(stack.container_ids(service))
        labels = container["Config"]["Labels"]
        assert labels["autoscale.managed"] == "true", service
        assert labels["autoscale.queue"] == queue, service
        env = dict(e.split("=", 1) for e in container["Config"]["Env"])
        # A warm shutdown must outlast the longest task.
        assert container["Config"]["StopTimeout"] > int(env["CELERY_TASK_TIME_LIMIT"]), service
    (beat,) = stack.inspect(stack.container_ids("beat"))
    assert beat["Config"]["Labels"]["autoscale.managed"] == "false"


def test_only_the_scaler_holds_the_docker_socket(stack: ComposeProject) -> None:
    for service in ["redis", "postgres", *APP_SERVICES]:
        (container,) = stack.inspect(stack.container_ids(service))
        sources = {m.get("Source") for m in container["Mounts"]}
        has_socket = any(str(src).endswith("docker.sock") for src in sources)
        assert has_socket == (service == "scaler"), (service, sources)
    (scaler,) = stack.inspect(stack.container_ids("scaler"))
    assert scaler["Config"]["Labels"]["autoscale.managed"] == "false", "the scaler scales itself"
    assert scaler["HostConfig"]["GroupAdd"] == [env_value(stack, "DOCKER_GID")]
    bindings = scaler["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for bs in bindings.values() for b in bs} == {"127.0.0.1"}, bindings
    policy = [m for m in scaler["Mounts"] if m["Destination"] == "/etc/scaler/policy.yaml"]
    assert len(policy) == 1 and policy[0]["RW"] is False, policy


def test_down_with_volumes_leaves_nothing_of_the_project(stack: ComposeProject) -> None:
    # First have the scaler add a container of its own (pinned: no burst needed), so that `down`
    # must also find and remove the scaler's clones.
    token = env_value(stack, "SCALER_TOKEN")
    code, body = http(stack, "POST", "/services/worker-default/pin", token, b'{"replicas": 2}')
    assert code == 200, body
    wait_until(
        "the scaler starts a second worker-default container",
        lambda: (
            len(stack.container_ids("worker-default")) == 2
            and status(stack)["services"]["worker-default"]["current"] == 2
        ),
        deadline_s=60,
    )
    names = {c["Name"].lstrip("/") for c in stack.inspect(stack.container_ids("worker-default"))}
    assert f"{stack.name}-worker-default-2" in names, names
    before = stack.leftovers()
    assert before["containers"] and before["volumes"] and before["networks"], before
    stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
