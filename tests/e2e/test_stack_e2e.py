"""The whole stack, end to end: `up --wait` on the real compose files, tasks through real workers.

Runs against real containers (Redis, PostgreSQL, beat, the five worker services) built from
compose/app.Dockerfile. The tests run in file order; the last one tears the stack down and checks
that nothing of the project is left.
"""

from __future__ import annotations

import base64
import json
import subprocess
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from compose_project import ComposeProject, read_env, wait_until
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
LONG_RUNNING = ["redis", "postgres", "gate", *APP_SERVICES]
GATE_PROBE = Path(__file__).with_name("probe_gate.py")


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
        # Redis also serves the scalers, which are not on `backend`, over `scaler-redis`.
        expected = {"redis": ["backend", "scaler-redis"], "postgres": ["backend"]}[service]
        assert sorted(networks) == [f"{stack.name}_{n}" for n in expected], (service, networks)


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


def test_only_the_gate_holds_the_docker_socket(stack: ComposeProject) -> None:
    for service in ["redis", "postgres", "gate", *APP_SERVICES]:
        (container,) = stack.inspect(stack.container_ids(service))
        sockets = [m for m in container["Mounts"] if str(m.get("Source")).endswith("docker.sock")]
        assert bool(sockets) == (service == "gate"), (service, sockets)
    (gate,) = stack.inspect(stack.container_ids("gate"))
    # The socket and the gate's token file (a secret), both read-only; nothing else.
    mounts = {m["Destination"]: m["RW"] for m in gate["Mounts"]}
    assert mounts == {"/var/run/docker.sock": False, "/run/secrets/gate_token": False}, mounts
    assert gate["HostConfig"]["GroupAdd"] == [env_value(stack, "DOCKER_GID")]
    assert stack.run("exec", "-T", "gate", "id", "-u").stdout.strip() == "10001"
    assert gate["Config"]["Labels"]["autoscale.managed"] == "false"
    (scaler,) = stack.inspect(stack.container_ids("scaler"))
    assert scaler["Config"]["Labels"]["autoscale.managed"] == "false", "the scaler scales itself"
    assert not scaler["HostConfig"]["GroupAdd"], "the scaler needs no group of the host"
    bindings = scaler["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for bs in bindings.values() for b in bs} == {"127.0.0.1"}, bindings
    policy = [m for m in scaler["Mounts"] if m["Destination"] == "/etc/scaler/policy.yaml"]
    assert len(policy) == 1 and policy[0]["RW"] is False, policy
    # The gate serves this project (the scaler found its project there) and has refused nothing
    # of the scaler's own work so far.
    health = stack.run("exec", "-T", "scaler", "python", "-c",
                       "import json; from scaler.backends.engine import gate_call;"
                       " from scaler.backends.engine import default_client_factory;"
                       " print(json.dumps(gate_call(default_client_factory()(), 'GET',"
                       " '/gate/v1/status')))").stdout  # fmt: skip
    gate_status = json.loads(health)
    assert gate_status["scope"]["value"] == stack.name, gate_status


def test_the_gate_refuses_what_the_scaler_does_not_need(stack: ComposeProject) -> None:
    """Code running as the scaler, with the scaler's client and token, through the gate: the
    scaler's reads pass; a privileged create, a bind of /, exec, another project's container,
    the scaler's own container, an old API version and a caller-written config are refused, and
    the engine shows nothing of them."""
    (worker,) = stack.container_ids("worker-default")
    (worker_info,) = stack.inspect([worker])
    probe_name = f"{stack.name}-gate-probe"
    other_project = f"{stack.name}-other"
    other = subprocess.run(
        ["docker", "run", "--detach", "--name", f"{other_project}-worker-default-1",
         "--label", "autoscale.managed=true",
         "--label", f"com.docker.compose.project={other_project}",
         "--label", "com.docker.compose.service=worker-default",
         "--label", "com.docker.compose.container-number=1",
         "--entrypoint", "sleep", worker_info["Config"]["Image"], "infinity"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        proc = stack.run("exec", "-T", "scaler", "python", "-", worker, probe_name, other,
                         stdin=GATE_PROBE.read_text())  # fmt: skip
        seen: dict[str, dict[str, Any]] = json.loads(proc.stdout)
        assert {k: seen[k]["status"] for k in ("ping", "list", "inspect")} == dict.fromkeys(
            ("ping", "list", "inspect"), "ok"
        ), seen
        expected = {
            "no-token": (401, "a valid bearer token is required"),
            "exec": (403, "/exec is not an operation of the gate"),
            "pull": (403, "/images/create is not an operation of the gate"),
            "volume": (403, "/volumes/create is not an operation of the gate"),
            "privileged": (403, "/containers/create is not an operation of the gate"),
            "host-root": (403, "/containers/create is not an operation of the gate"),
            "host-pid": (403, "/containers/create is not an operation of the gate"),
            "other-project-stop": (404, "no managed container"),
            "other-project-inspect": (404, "no managed container"),
            "own-container-stop": (404, "no managed container"),
            "old-api-version": (400, "API version 1.24 is older than 1.41"),
            "versioned-replicas": (403, "is not an operation of the gate"),
            "replica-with-config": (400, "HostConfig"),
            "encoded-path": (403, "is not an operation of the gate"),
        }
        for call, (code, words) in expected.items():
            assert seen[call]["status"] == code, (call, seen[call])
            assert words in seen[call]["message"], (call, seen[call])
        # Nothing of it reached the engine: no container or volume made, the other project's
        # container and the scaler still run.
        for kind in ("container", "volume"):
            found = subprocess.run(["docker", kind, "inspect", probe_name], capture_output=True)
            assert found.returncode != 0, f"a {kind} {probe_name} was created"
        (other_info,) = stack.inspect([other])
        assert other_info["State"]["Running"], "the other project's container was stopped"
        (scaler,) = stack.inspect(stack.container_ids("scaler"))
        assert scaler["State"]["Running"], "the scaler's own container was stopped"
        for number in (90, 91):
            found = subprocess.run(
                ["docker", "container", "inspect", f"{stack.name}-worker-default-{number}"],
                capture_output=True,
            )
            assert found.returncode != 0, f"worker-default-{number} was created"
    finally:
        subprocess.run(["docker", "rm", "-f", other], capture_output=True)
    # A worker cannot reach the engine at all: the gate is on a network only the scalers join.
    reach = stack.run(
        "exec", "-T", "worker-default", "python", "-c",
        "import socket; socket.create_connection(('gate', 2375), timeout=3)",
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
        "import os, psycopg2; c = psycopg2.connect(open(os.environ['DATABASE_URL_FILE']).read());"
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


# Run inside a worker's container: a TCP connection to each target, "ok" or the error it got.
CONNECT_PROBE = """
import json, socket, sys
results = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        results[target] = "ok"
    except OSError as exc:
        results[target] = f"{type(exc).__name__}: {exc}"
print(json.dumps(results))
"""


def test_no_worker_can_reach_the_scalers_api_which_answers_on_the_hosts_loopback(
    stack: ComposeProject,
) -> None:
    """Workers share no network with the scaler: from inside one, neither the scaler's name nor
    any of its addresses takes a connection on the API's port (Redis, as a control, does). From
    the host, over the published loopback port, the API answers, refuses a foreign Host (DNS
    rebinding) and sends the dashboard's Content-Security-Policy."""
    (scaler,) = stack.inspect(stack.container_ids("scaler"))
    addresses = [n["IPAddress"] for n in scaler["NetworkSettings"]["Networks"].values()]
    assert len(addresses) == 3 and all(addresses), scaler["NetworkSettings"]["Networks"]
    assert not any(name.endswith("_backend") for name in scaler["NetworkSettings"]["Networks"])
    targets = ["scaler:9808", *(f"{a}:9808" for a in addresses), "redis:6379"]
    for worker in ("worker-default", "worker-io"):
        out = stack.run(
            "exec", "-T", worker, "python", "-c", CONNECT_PROBE, json.dumps(targets)
        ).stdout
        results = json.loads(out)
        assert results.pop("redis:6379") == "ok", "the probe can connect at all"
        assert all(r != "ok" for r in results.values()), (worker, results)
    # The scaler has no database URL: it never talks to PostgreSQL.
    env = dict(e.split("=", 1) for e in scaler["Config"]["Env"])
    assert "DATABASE_URL" not in env and "POSTGRES_APP_PASSWORD" not in env, sorted(env)

    port = env_value(stack, "SCALER_HTTP_PORT_HOST")
    assert http(stack, "GET", "/healthz")[0] == 200
    for host, expected in ((f"127.0.0.1:{port}", 200), ("evil.example", 421)):
        conn = HTTPConnection("127.0.0.1", int(port), timeout=5)
        try:
            conn.request("GET", "/status", headers={"Host": host})
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == expected, (host, response.status, body)
        finally:
            conn.close()
    assert "DNS rebinding" in json.loads(body)["error"]
    conn = HTTPConnection("127.0.0.1", int(port), timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert "frame-ancestors 'none'" in (response.getheader("Content-Security-Policy") or "")
    finally:
        conn.close()


# Every password and token of the env file: none may show in any container's `docker inspect`.
SECRET_VARIABLES = (
    "REDIS_WORKER_PASSWORD",
    "REDIS_SCALER_PASSWORD",
    "REDIS_ADMIN_PASSWORD",
    "POSTGRES_PASSWORD",
    "POSTGRES_APP_PASSWORD",
    "FLOWER_PASSWORD",
    "SCALER_TOKEN",
    "SCALER_GATE_TOKEN",
)


def test_no_container_shows_a_secret_and_each_reads_its_own_from_files(
    stack: ComposeProject,
) -> None:
    """Every container of the project (Flower, the one-shot migrate and any clone of the scaler
    included): no secret value anywhere in `docker inspect` (environment, command, labels, health
    log, ...); the secrets are read-only bind mounts at /run/secrets from the stack's directory
    of secret files, and the services that read them work (the tests above)."""
    values = read_env(stack.env_file)
    secrets = {var: values[var] for var in SECRET_VARIABLES}
    assert all(len(v) >= 16 for v in secrets.values()), "init-env.sh generates every secret"
    containers = stack.inspect(stack.leftovers()["containers"])
    services = {c["Config"]["Labels"]["com.docker.compose.service"] for c in containers}
    assert {"flower", "migrate", *LONG_RUNNING} <= services, services
    secrets_dir = values["SECRETS_DIR"]
    for container in containers:
        name = container["Name"].lstrip("/")
        assert not secrets_shown(stack, container), f"{name}: `docker inspect` shows secrets"
        for mount in container["Mounts"]:
            if mount["Destination"].startswith("/run/secrets/"):
                assert mount["Type"] == "bind" and mount["RW"] is False, (name, mount)
                assert Path(mount["Source"]).parent == Path(secrets_dir), (name, mount)
    # Each reads its own: the app's user in a worker and in the scaler, root's entrypoint in
    # postgres; Flower asks for its login (the file's), and the scaler's clone (below) starts.
    for service, path in (
        ("worker-default", "/run/secrets/broker_url"),
        ("scaler", "/run/secrets/gate_token"),
        ("postgres", "/run/secrets/postgres_password"),
    ):
        assert stack.run("exec", "-T", service, "test", "-r", path, check=False).returncode == 0
    flower_port = int(values["FLOWER_HOST_PORT"])
    user, password = values["FLOWER_USER"], secrets["FLOWER_PASSWORD"]
    assert flower_status(flower_port, None) == 401
    assert flower_status(flower_port, f"{user}:{password}") < 400
    assert flower_status(flower_port, f"{user}:wrong-{password}") == 401


def secrets_shown(stack: ComposeProject, container: dict[str, Any]) -> list[str]:
    """The env file's secret variables whose value is anywhere in an inspected container."""
    values = read_env(stack.env_file)
    text = json.dumps(container)
    return sorted(var for var in SECRET_VARIABLES if values[var] in text)


def flower_status(port: int, login: str | None) -> int:
    """The status of Flower's dashboard on the host's loopback, with basic auth ``login``."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {}
    if login is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    try:
        conn.request("GET", "/", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


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
    assert secrets_shown(stack, clone) == [], "the clone's inspect shows no secret either"
    for key in HARDENING_KEYS:
        assert clone["HostConfig"].get(key) == original["HostConfig"].get(key), key
    before = stack.leftovers()
    assert before["containers"] and before["volumes"] and before["networks"], before
    stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
