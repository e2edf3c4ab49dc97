"""The compose files as Compose itself resolves them (`docker compose config`): what the base file
and the production override promise, checked without starting anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from compose_project import COMPOSE_DIR, ROOT

BASE = COMPOSE_DIR / "compose.yaml"
PROD = COMPOSE_DIR / "compose.prod.yaml"
WORKERS = {
    "worker-default": "default",
    "worker-cpu": "cpu_intensive",
    "worker-io": "io_intensive",
    "worker-priority": "priority",
    "worker-scheduled": "scheduled",
}
SCALERS = ("scaler", "scaler-standby")
LONG_RUNNING = ["redis", "postgres", "beat", "flower", *WORKERS, *SCALERS]
REDIS_USERS = {"worker": "REDIS_WORKER_PASSWORD", "scaler": "REDIS_SCALER_PASSWORD",
               "admin": "REDIS_ADMIN_PASSWORD"}  # fmt: skip
SECRET_VARS = (
    *REDIS_USERS.values(),
    *(f"{v}_SHA256" for v in REDIS_USERS.values()),
    "POSTGRES_PASSWORD",
    "FLOWER_USER",
    "FLOWER_PASSWORD",
)
ALL_PROFILES = ("monitoring", "ha")
SCALER_BINDS = {"/etc/scaler/policy.yaml"}
PROXY = "docker-proxy"
# The only capabilities added back after cap_drop ALL: the entrypoints of the official redis and
# postgres images chown their data and drop to their own user (compose.yaml says which needs what).
CAP_ADD = {
    "redis": {"CHOWN", "DAC_READ_SEARCH", "SETUID", "SETGID"},
    "postgres": {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"},
}
TMPFS = {
    "postgres": {"/tmp", "/var/run/postgresql"},
    "scaler": {"/tmp", "/app/.scaler"},
    "scaler-standby": {"/tmp", "/app/.scaler"},
    "beat": {"/tmp"},
    **{name: {"/tmp"} for name in WORKERS},
}

pytestmark = pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="COMPOSE CONFIG TESTS SKIPPED: no `docker compose` CLI here",
)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / ".env"
    subprocess.run(
        ["bash", str(ROOT / "compose/scripts/init-env.sh"), str(ROOT / ".env.example"), path],
        check=True,
        capture_output=True,
    )
    return path


def duration_s(text: str) -> float:
    """Seconds in a Go duration as Compose prints it ("2m30s", "150s", "1h0m0s")."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    assert parts and text, f"not a duration: {text!r}"
    h, m, s = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + s


def config(
    env_file: Path,
    *files: Path,
    profiles: tuple[str, ...] = ALL_PROFILES,
    env_extra: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> dict[str, Any]:
    cmd = ["docker", "compose", "--env-file", str(env_file)]
    for profile in profiles:
        cmd += ["--profile", profile]
    for f in files:
        cmd += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and k not in drop}
    # `make up` exports the Docker socket's group id; any number will do to resolve the files.
    if "DOCKER_GID" not in drop:
        env.setdefault("DOCKER_GID", "4242")
    env.update(env_extra or {})
    out = subprocess.run(
        [*cmd, "config", "--format", "json"], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_base_file_shape(env_file: Path) -> None:
    cfg = config(env_file, BASE)
    services = cfg["services"]
    assert cfg["name"] == "celery-stack"
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: container_name prevents scaling"
        for volume in svc.get("volumes", []):
            if name in SCALERS and volume["target"] in SCALER_BINDS:
                continue  # the read-only policy: the scalers only
            if name == PROXY and volume["target"] == "/var/run/docker.sock":
                continue  # the Docker socket: the proxy only
            assert volume["type"] == "volume", f"{name}: source/bind mount {volume}"
    for name in ("redis", "postgres"):
        assert not services[name].get("ports"), f"{name} publishes a port"
    (flower_port,) = services["flower"]["ports"]
    assert flower_port["host_ip"] == "127.0.0.1"
    assert services["flower"]["profiles"] == ["monitoring"]
    assert cfg["networks"]["backend"]["internal"] is True
    assert "--appendonly" in services["redis"]["command"]


def test_workers_consume_one_queue_each_with_scaler_labels(env_file: Path) -> None:
    services = config(env_file, BASE)["services"]
    for name, queue in WORKERS.items():
        svc = services[name]
        assert svc["environment"]["WORKER_QUEUE"] == queue
        assert svc["labels"] == {"autoscale.managed": "true", "autoscale.queue": queue}
        assert svc["init"] is True
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc["healthcheck"]["test"][1] == "healthcheck-file.sh"
        time_limit = int(svc["environment"]["CELERY_TASK_TIME_LIMIT"])
        assert duration_s(svc["stop_grace_period"]) > time_limit, name
    assert services["worker-io"]["environment"]["WORKER_POOL"] == "threads"
    assert services["worker-cpu"]["environment"]["WORKER_POOL"] == "prefork"
    assert services["beat"]["labels"]["autoscale.managed"] == "false"


def pids_limit(svc: dict[str, Any]) -> int:
    return int(((svc.get("deploy") or {}).get("resources") or {}).get("limits", {}).get("pids", 0))


def test_base_file_hardens_every_container(env_file: Path) -> None:
    """`make up` without PROD=1 is production-safe: least privilege, restarts, rotated logs."""
    services = config(env_file, BASE)["services"]
    for name, svc in services.items():
        assert svc.get("cap_drop") == ["ALL"], f"{name}: cap_drop {svc.get('cap_drop')}"
        added = set(svc.get("cap_add") or [])
        assert added <= CAP_ADD.get(name, set()), f"{name} adds capabilities {sorted(added)}"
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("read_only") is True, f"{name}: writable root filesystem"
        assert 0 < pids_limit(svc) <= 1024, f"{name}: pids limit {pids_limit(svc)}"
        expected_restart = "on-failure:5" if name == "migrate" else "unless-stopped"
        assert svc.get("restart") == expected_restart, f"{name}: restart {svc.get('restart')}"
        logging = svc.get("logging") or {}
        assert logging.get("driver") == "json-file", f"{name}: logging {logging}"
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) > 1, name
    # Where each writes, other than its volumes: a tmpfs (the root filesystem is read-only).
    for name, paths in TMPFS.items():
        mounted = {entry.split(":", 1)[0] for entry in services[name].get("tmpfs", [])}
        assert paths <= mounted, f"{name}: tmpfs {sorted(mounted)}, needs {sorted(paths)}"
    scaler_state = services["scaler"]["environment"]["SCALER_STATE_FILE"]
    assert str(Path(scaler_state).parent) in TMPFS["scaler"], scaler_state


def test_only_migrate_holds_the_database_owner(env_file: Path) -> None:
    """The tasks connect as the app role; the owner's password is in postgres and migrate only."""
    services = config(env_file, BASE)["services"]
    pairs = (x.split("=", 1) for x in env_file.read_text().splitlines() if "=" in x)
    values = {k: v for k, v in pairs if not k.startswith("#")}
    for name, svc in services.items():
        env = svc.get("environment") or {}
        holds_owner = any(values["POSTGRES_PASSWORD"] in str(v) for v in env.values())
        assert holds_owner == (name in ("postgres", "migrate")), f"{name}: the owner password"
        if "DATABASE_URL" in env and name != "migrate":
            assert env["DATABASE_URL"].startswith("postgresql://celery_app:"), name
    migrate = services["migrate"]["environment"]
    assert migrate["DATABASE_URL"].startswith("postgresql://celery:"), "migrate runs as owner"
    assert migrate["POSTGRES_APP_USER"] == "celery_app"
    assert migrate["POSTGRES_APP_PASSWORD"] == values["POSTGRES_APP_PASSWORD"]


def test_prod_override_adds_limits_and_keeps_the_hardening(env_file: Path) -> None:
    base = config(env_file, BASE)["services"]
    prod = config(env_file, BASE, PROD)["services"]
    assert set(prod) == set(base), "the override adds or drops no service"
    for name in LONG_RUNNING:
        limits = prod[name]["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and int(limits["memory"]) > 0, name
        assert "memory" not in base[name]["deploy"]["resources"]["limits"], name
    for name in base:
        for key in ("cap_drop", "cap_add", "security_opt", "read_only", "restart", "logging"):
            assert prod[name].get(key) == base[name].get(key), f"{name}: PROD=1 changes {key}"
        assert pids_limit(prod[name]) == pids_limit(base[name]), f"{name}: PROD=1 loses pids"


@pytest.mark.parametrize(
    "missing",
    [
        "REDIS_WORKER_PASSWORD",
        "REDIS_SCALER_PASSWORD_SHA256",
        "POSTGRES_PASSWORD",
        "FLOWER_PASSWORD",
    ],
)
def test_missing_secret_stops_compose_naming_it(
    tmp_path: Path, env_file: Path, missing: str
) -> None:
    broken = tmp_path / ".env"
    broken.write_text(
        "".join(
            line + "\n"
            for line in env_file.read_text().splitlines()
            if not line.startswith(f"{missing}=")
        )
    )
    with pytest.raises(subprocess.CalledProcessError) as err:
        config(broken, BASE)
    assert f"set {missing} in .env" in err.value.stderr


def test_the_proxy_alone_holds_the_socket_and_scalers_publish_on_loopback(env_file: Path) -> None:
    cfg = config(env_file, BASE, env_extra={"DOCKER_GID": "987"})
    services = cfg["services"]
    for name, svc in services.items():
        sockets = [v for v in svc.get("volumes", []) if v["target"] == "/var/run/docker.sock"]
        assert bool(sockets) == (name == PROXY), f"{name}: Docker socket mount {sockets}"
        assert ("docker-api" in svc.get("networks", {})) == (name in (PROXY, *SCALERS)), name
        if name != PROXY:
            assert "group_add" not in svc, f"{name} joins a group: {svc['group_add']}"
    proxy = services[PROXY]
    (socket,) = proxy["volumes"]
    assert socket["read_only"] is True and socket["type"] == "bind"
    assert proxy["group_add"] == ["987"]
    assert not proxy.get("ports"), "the proxy publishes nothing"
    assert list(proxy["networks"]) == ["docker-api"]
    assert cfg["networks"]["docker-api"]["internal"] is True
    assert proxy["cap_drop"] == ["ALL"] and not proxy.get("cap_add")
    ports = set()
    for name in SCALERS:
        svc = services[name]
        assert svc["environment"]["DOCKER_HOST"] == "tcp://docker-proxy:2375", name
        assert svc["depends_on"][PROXY]["condition"] == "service_healthy", name
        assert svc["command"][:4] == ["scaler", "run", "--backend", "compose"], svc["command"]
        assert "--project" not in svc["command"], "the project comes from the container's label"
        (policy,) = [v for v in svc["volumes"] if v["target"] == "/etc/scaler/policy.yaml"]
        assert policy["read_only"] is True
        assert Path(policy["source"]) == COMPOSE_DIR / "scaler-policy.yaml"
        (port,) = svc["ports"]
        assert port["host_ip"] == "127.0.0.1" and port["target"] == 9808, port
        ports.add(port["published"])
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc["labels"]["autoscale.managed"] == "false", f"{name} must not scale itself"
        assert svc["environment"]["SCALER_TOKEN"], "SCALER_TOKEN from .env"
        assert "edge" in svc["networks"], "a port cannot be published from the internal network"
    assert ports == {"9808", "9809"}, "leader and standby need distinct host ports"
    assert services["scaler-standby"]["profiles"] == ["ha"]
    assert "profiles" not in services["scaler"], "the scaler is part of the default stack"


def test_missing_docker_gid_stops_compose_naming_it(env_file: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        config(env_file, BASE, drop=("DOCKER_GID",))
    assert "DOCKER_GID" in err.value.stderr and "stat -c %g" in err.value.stderr


def test_stack_policy_manages_exactly_the_worker_services() -> None:
    from scaler.policy import load_policy

    policy = load_policy(COMPOSE_DIR / "scaler-policy.yaml")
    assert set(policy.services) == set(WORKERS)
    for name, queue in WORKERS.items():
        svc = policy.services[name]
        assert list(svc.queues) == [queue], name
        assert 1 <= svc.min_replicas < svc.max_replicas, f"{name} cannot scale"


def env_values(env_file: Path) -> dict[str, str]:
    pairs = (x.split("=", 1) for x in env_file.read_text().splitlines() if "=" in x)
    return {k: v for k, v in pairs if not k.startswith("#")}


def test_redis_users_hold_no_password_in_redis_and_each_service_its_own(env_file: Path) -> None:
    """The redis container gets only hashes (docker inspect shows no password); the scalers
    connect as `scaler`, every other Redis client as `worker`; nobody as `admin` or `default`."""
    services = config(env_file, BASE)["services"]
    values = env_values(env_file)
    redis_svc = json.dumps(services["redis"])
    for user, var in REDIS_USERS.items():
        assert values[var] not in redis_svc, f"the {user} password is visible in redis"
        assert f"#{values[var + '_SHA256']}" in services["redis"]["command"], user
    command = services["redis"]["command"]
    assert command[command.index("default") + 1] == "off", "the default user must be off"
    for name, svc in services.items():
        env = svc.get("environment") or {}
        urls = [env[k] for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND") if k in env]
        user = "scaler" if name in SCALERS else "worker"
        for url in urls:
            assert url.startswith(f"redis://{user}:{values[REDIS_USERS[user]]}@redis:"), name
        assert values["REDIS_ADMIN_PASSWORD"] not in json.dumps(svc), f"{name} holds admin"


def test_redis_maxmemory_is_below_its_memory_limit(env_file: Path) -> None:
    """noeviction refuses writes at maxmemory: that must happen before the memory limit kills
    Redis (80 %: room for the AOF rewrite's fork and the clients' buffers)."""
    redis_svc = config(env_file, BASE, PROD)["services"]["redis"]
    command = redis_svc["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    size = re.fullmatch(r"(\d+)(mb|gb)", command[command.index("--maxmemory") + 1].lower())
    assert size, command
    maxmemory = int(size[1]) * (2**20 if size[2] == "mb" else 2**30)
    limit = int(redis_svc["deploy"]["resources"]["limits"]["memory"])
    assert 0 < maxmemory <= 0.8 * limit, (maxmemory, limit)
