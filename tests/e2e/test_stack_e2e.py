"""The whole stack, end to end: `up --wait` on the real compose files, tasks through real workers.

Runs against real containers (Redis, PostgreSQL, beat, the five worker services) built from
compose/app.Dockerfile. The tests run in file order; the last one tears the stack down and checks
that nothing of the project is left.
"""

from __future__ import annotations

import json
import subprocess
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
LONG_RUNNING = ["redis", "postgres", "docker-proxy", *APP_SERVICES]
PROXY_PROBE = Path(__file__).with_name("probe_docker_proxy.py")


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


def test_only_the_docker_proxy_holds_the_docker_socket(stack: ComposeProject) -> None:
    for service in ["redis", "postgres", "docker-proxy", *APP_SERVICES]:
        (container,) = stack.inspect(stack.container_ids(service))
        sockets = [m for m in container["Mounts"] if str(m.get("Source")).endswith("docker.sock")]
        assert bool(sockets) == (service == "docker-proxy"), (service, sockets)
    (proxy,) = stack.inspect(stack.container_ids("docker-proxy"))
    assert [m["RW"] for m in proxy["Mounts"]] == [False], proxy["Mounts"]
    assert proxy["HostConfig"]["GroupAdd"] == [env_value(stack, "DOCKER_GID")]
    assert stack.run("exec", "-T", "docker-proxy", "id", "-u").stdout.strip() != "0"
    (scaler,) = stack.inspect(stack.container_ids("scaler"))
    assert scaler["Config"]["Labels"]["autoscale.managed"] == "false", "the scaler scales itself"
    assert not scaler["HostConfig"]["GroupAdd"], "the scaler needs no group of the host"
    bindings = scaler["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for bs in bindings.values() for b in bs} == {"127.0.0.1"}, bindings
    policy = [m for m in scaler["Mounts"] if m["Destination"] == "/etc/scaler/policy.yaml"]
    assert len(policy) == 1 and policy[0]["RW"] is False, policy


def test_docker_proxy_refuses_what_the_scaler_does_not_need(stack: ComposeProject) -> None:
    """The scaler's own client, through docker-proxy: its calls pass, the rest get a 403 naming
    the call or the setting, and the engine shows nothing of the refused ones."""
    (worker,) = stack.container_ids("worker-default")
    probe_name = f"{stack.name}-proxy-probe"
    proc = stack.run("exec", "-T", "scaler", "python", "-", worker, probe_name,
                     stdin=PROXY_PROBE.read_text())  # fmt: skip
    seen: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    assert {k: seen[k]["status"] for k in ("ping", "list", "inspect")} == dict.fromkeys(
        ("ping", "list", "inspect"), "ok"
    ), seen
    expected = {
        "exec": "/exec is not on the scaler's allowlist",
        "pull": "/images/create is not on the scaler's allowlist",
        "volume": "/volumes/create is not on the scaler's allowlist",
        "privileged": "it asks for privileged mode",
        "host-root": "it asks for a bind mount from the host",
        "host-pid": "it asks for a host or another container's namespace",
    }
    for call, words in expected.items():
        assert seen[call]["status"] == 403, (call, seen[call])
        assert "docker-proxy" in seen[call]["message"] and words in seen[call]["message"], seen
    # Nothing of it reached the engine.
    for kind in ("container", "volume"):
        found = subprocess.run(["docker", kind, "inspect", probe_name], capture_output=True)
        assert found.returncode != 0, f"a {kind} {probe_name} was created"
    # A worker cannot reach the engine at all: the proxy is on a network only the scaler joins.
    reach = stack.run(
        "exec", "-T", "worker-default", "python", "-c",
        "import socket; socket.create_connection(('docker-proxy', 2375), timeout=3)",
        check=False,
    )  # fmt: skip
    assert reach.returncode != 0 and "gaierror" in reach.stderr, reach.stderr


# Capabilities added back after cap_drop ALL (compose.yaml explains each); none elsewhere.
CAP_ADD = {
    "redis": {"CHOWN", "DAC_READ_SEARCH", "SETUID", "SETGID"},
    "postgres": {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"},
}
HARDENING_KEYS = (
    "CapDrop", "CapAdd", "SecurityOpt", "ReadonlyRootfs", "Tmpfs", "PidsLimit", "RestartPolicy",
    "LogConfig", "Privileged",
)  # fmt: skip


def hardening_problems(container: dict[str, Any]) -> list[str]:
    """What in one inspected container breaks the base file's promise (empty: nothing)."""
    host = container["HostConfig"]
    service = container["Config"]["Labels"]["com.docker.compose.service"]
    name = container["Name"].lstrip("/")
    problems = []
    if "ALL" not in (host.get("CapDrop") or []):
        problems.append(f"{name}: CapDrop {host.get('CapDrop')}")
    # Docker names them CAP_CHOWN, ...; Compose files without the prefix.
    added = {c.removeprefix("CAP_") for c in host.get("CapAdd") or []}
    if not added <= CAP_ADD.get(service, set()):
        problems.append(f"{name}: CapAdd {host.get('CapAdd')}")
    if "no-new-privileges:true" not in (host.get("SecurityOpt") or []):
        problems.append(f"{name}: SecurityOpt {host.get('SecurityOpt')}")
    if host.get("ReadonlyRootfs") is not True or host.get("Privileged"):
        problems.append(f"{name}: ReadonlyRootfs {host.get('ReadonlyRootfs')}")
    if not (host.get("PidsLimit") or 0) > 0:
        problems.append(f"{name}: PidsLimit {host.get('PidsLimit')}")
    if host["RestartPolicy"]["Name"] not in ("unless-stopped", "on-failure"):
        problems.append(f"{name}: RestartPolicy {host['RestartPolicy']}")
    log = host.get("LogConfig") or {}
    if log.get("Type") != "json-file" or not (log.get("Config") or {}).get("max-size"):
        problems.append(f"{name}: LogConfig {log}")
    return problems


def test_every_container_is_hardened_and_tasks_use_the_app_role(stack: ComposeProject) -> None:
    """`make up` as it ships (no PROD=1): every container of the project, Flower and the one-shot
    migrate included, drops its capabilities and runs read-only, and still works."""
    stack.run("--profile", "monitoring", "up", "--detach", "--no-deps", "flower")
    wait_until(
        "Flower answers on a read-only root filesystem",
        lambda: stack.run("exec", "-T", "flower", "python", "-c",
                          "import urllib.request as u;"
                          " u.urlopen('http://127.0.0.1:5555/healthcheck', timeout=2)",
                          check=False).returncode == 0,
        deadline_s=60,
    )  # fmt: skip
    ids = stack.leftovers()["containers"]
    containers = stack.inspect(ids)
    services = {c["Config"]["Labels"]["com.docker.compose.service"] for c in containers}
    assert {"flower", "migrate", *LONG_RUNNING} <= services, services
    problems = [p for c in containers for p in hardening_problems(c)]
    assert problems == [], "\n".join(problems)
    # The workers' PostgreSQL sessions are the app role's, never the owner's.
    users = stack.psql(
        "SELECT DISTINCT usename FROM pg_stat_activity"
        " WHERE application_name LIKE 'celery-service:%'"
    )
    assert users == [[env_value(stack, "POSTGRES_APP_USER")]], users
    denied = stack.run(
        "exec", "-T", "worker-default", "python", "-c",
        "import os, psycopg2; c = psycopg2.connect(os.environ['DATABASE_URL']);"
        " c.cursor().execute('DROP TABLE task_effects')",
        check=False,
    )  # fmt: skip
    assert denied.returncode != 0 and "must be owner of table" in denied.stderr, denied.stderr


def test_redis_refused_no_client_of_the_stack_and_workers_cannot_reach_the_scalers_keys(
    stack: ComposeProject,
) -> None:
    """Redis's ACL users (compose.yaml) in the running stack. Run late, after the bursts, the
    scale-ups, drains, restores, pings, beat and the scaler's lease and overrides: none of them
    was refused (the ACL log, which records every refusal, is empty); then a worker's
    credentials are refused on the lease and the overrides, and the scaler's lease is there."""

    def cli(user: str, *args: str) -> str:
        password = env_value(stack, f"REDIS_{user.upper()}_PASSWORD")
        proc = stack.run("exec", "-T", "redis", "redis-cli", "--user", user, "--pass", password,
                         "--no-auth-warning", *args, check=False)  # fmt: skip
        return (proc.stdout + proc.stderr).strip()

    assert cli("admin", "ACL", "LOG") == "", "a client of the stack was refused by Redis"
    assert cli("scaler", "EXISTS", "leader:scaler") == "1", "the scaler holds its lease"
    assert cli("worker", "GET", "leader:scaler").startswith("NOPERM")
    assert cli("worker", "HSET", "scaler:overrides", "worker-io", "{}").startswith("NOPERM")
    assert cli("worker", "FLUSHALL").startswith("NOPERM")
    anonymous = stack.run("exec", "-T", "redis", "redis-cli", "GET", "leader:scaler", check=False)
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr


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
    replicas = {
        c["Name"].lstrip("/"): c for c in stack.inspect(stack.container_ids("worker-default"))
    }
    clone, original = (replicas.get(f"{stack.name}-worker-default-{n}") for n in (2, 1))
    assert clone and original, sorted(replicas)
    # The scaler's clone keeps the service's hardening: the same settings as Compose's replica.
    assert hardening_problems(clone) == []
    for key in HARDENING_KEYS:
        assert clone["HostConfig"].get(key) == original["HostConfig"].get(key), key
    before = stack.leftovers()
    assert before["containers"] and before["volumes"] and before["networks"], before
    stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
