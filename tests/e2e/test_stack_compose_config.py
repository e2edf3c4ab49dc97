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
from compose_project import COMPOSE_DIR, fresh_env_file, secrets_dir_of, write_secrets

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
    "POSTGRES_APP_PASSWORD",
    "FLOWER_USER",
    "FLOWER_PASSWORD",
    "SCALER_TOKEN",
    "SCALER_GATE_TOKEN",
    # The secret files: the env file under test names its own (fresh_env_file).
    "SECRETS_DIR",
    "SECRETS_DIGEST",
)
# Every password and token: none may be in any service's definition (`docker inspect`), only in
# the files mounted at /run/secrets of the services that use it.
PASSWORDS = (
    *REDIS_USERS.values(),
    "POSTGRES_PASSWORD",
    "POSTGRES_APP_PASSWORD",
    "FLOWER_PASSWORD",
    "SCALER_TOKEN",
    "SCALER_GATE_TOKEN",
)
ALL_PROFILES = ("monitoring", "ha")
SCALER_BINDS = {"/etc/scaler/policy.yaml"}
GATE = "gate"
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
    """A fresh env file and its secret files, as `make up` writes them."""
    return fresh_env_file(tmp_path_factory.mktemp("cfg"), {})


def mounted(cfg: dict[str, Any], name: str) -> dict[str, str]:
    """Path in the container -> content of each secret file the service mounts (/run/secrets)."""
    files: dict[str, str] = {}
    for entry in cfg["services"][name].get("secrets") or []:
        target = entry.get("target") or entry["source"]
        path = target if target.startswith("/") else f"/run/secrets/{target}"
        files[path] = Path(cfg["secrets"][entry["source"]]["file"]).read_text()
    return files


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
            if name == GATE and volume["target"] == "/var/run/docker.sock":
                continue  # the Docker socket: the gate only
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
    """The tasks connect as the app role; the owner's password is in postgres and migrate only,
    as files (/run/secrets) the services read through X_FILE."""
    cfg = config(env_file, BASE)
    values = env_values(env_file)
    for name, svc in cfg["services"].items():
        env = svc.get("environment") or {}
        files = mounted(cfg, name)
        holds_owner = any(values["POSTGRES_PASSWORD"] in v for v in files.values())
        assert holds_owner == (name in ("postgres", "migrate")), f"{name}: the owner password"
        if "DATABASE_URL_FILE" in env and name != "migrate":
            url = files[env["DATABASE_URL_FILE"]]
            assert url.startswith(f"postgresql://celery_app:{values['POSTGRES_APP_PASSWORD']}@")
    migrate = cfg["services"]["migrate"]["environment"]
    files = mounted(cfg, "migrate")
    owner_url = f"postgresql://celery:{values['POSTGRES_PASSWORD']}@postgres:5432/celery"
    assert files[migrate["DATABASE_URL_FILE"]] == owner_url, "migrate runs as owner"
    assert migrate["POSTGRES_APP_USER"] == "celery_app"
    assert files[migrate["POSTGRES_APP_PASSWORD_FILE"]] == values["POSTGRES_APP_PASSWORD"]
    postgres = cfg["services"]["postgres"]["environment"]
    owner_file = postgres["POSTGRES_PASSWORD_FILE"]
    assert mounted(cfg, "postgres")[owner_file] == values["POSTGRES_PASSWORD"]
    assert "POSTGRES_PASSWORD" not in postgres


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


def without(env_file: Path, missing: str, directory: Path) -> Path:
    broken = directory / ".env"
    broken.write_text(
        "".join(
            line + "\n"
            for line in env_file.read_text().splitlines()
            if not line.startswith(f"{missing}=")
        )
    )
    return broken


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("REDIS_WORKER_PASSWORD_SHA256", "set REDIS_WORKER_PASSWORD_SHA256 in .env"),
        ("REDIS_SCALER_PASSWORD_SHA256", "set REDIS_SCALER_PASSWORD_SHA256 in .env"),
        ("SECRETS_DIR", "set SECRETS_DIR to the absolute path of the secret files"),
    ],
)
def test_missing_setting_stops_compose_naming_it(
    tmp_path: Path, env_file: Path, missing: str, message: str
) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        config(without(env_file, missing, tmp_path), BASE)
    assert message in err.value.stderr


@pytest.mark.parametrize(
    "missing",
    [
        "REDIS_WORKER_PASSWORD",
        "REDIS_SCALER_PASSWORD",
        "POSTGRES_PASSWORD",
        "POSTGRES_APP_PASSWORD",
        "FLOWER_PASSWORD",
        "SCALER_GATE_TOKEN",
    ],
)
def test_missing_secret_stops_the_secret_files_naming_it(
    tmp_path: Path, env_file: Path, missing: str
) -> None:
    """Compose never sees the passwords: `make up`'s write-secrets.sh (after check-env.sh) does,
    and stops naming the one missing, writing nothing."""
    broken = without(env_file, missing, tmp_path)
    with pytest.raises(subprocess.CalledProcessError) as err:
        write_secrets(broken)
    assert f"{missing} is missing or empty" in err.value.stderr.decode()
    assert not Path(secrets_dir_of(broken)).exists()


def test_secret_files_are_private_to_whoever_writes_them(env_file: Path) -> None:
    """The directory is 0700 (no other user of the host reaches a file in it); each file is
    0444 because Compose bind-mounts it as it is and the containers' user (uid 10001) reads it."""
    directory = Path(secrets_dir_of(env_file))
    assert directory.stat().st_mode & 0o777 == 0o700
    assert directory.stat().st_uid == os.getuid()
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o444, path
        assert "\n" not in path.read_text(), f"{path.name}: one value, no newline"


def test_the_gate_alone_holds_the_socket_and_scalers_publish_on_loopback(env_file: Path) -> None:
    cfg = config(env_file, BASE, env_extra={"DOCKER_GID": "987"})
    services = cfg["services"]
    values = env_values(env_file)
    for name, svc in services.items():
        sockets = [v for v in svc.get("volumes", []) if v["target"] == "/var/run/docker.sock"]
        assert bool(sockets) == (name == GATE), f"{name}: Docker socket mount {sockets}"
        assert ("docker-api" in svc.get("networks", {})) == (name in (GATE, *SCALERS)), name
        if name != GATE:
            assert "group_add" not in svc, f"{name} joins a group: {svc['group_add']}"
            assert "DOCKER_SOCKET" not in json.dumps(svc), name
    assert "docker-proxy" not in services, "the gate replaced docker-proxy on Compose"
    gate = services[GATE]
    (socket,) = gate["volumes"]
    assert socket["read_only"] is True and socket["type"] == "bind"
    assert socket["source"] == os.environ.get("DOCKER_SOCKET", "/var/run/docker.sock")
    assert gate["group_add"] == ["987"]
    assert gate.get("user") in (None, "app", "10001"), "the app's user, never root"
    assert gate["image"] == services["scaler"]["image"], "the application image"
    assert gate["command"] == ["python", "-m", "scaler.gate"]
    assert not gate.get("ports"), "the gate publishes nothing"
    assert list(gate["networks"]) == ["docker-api"]
    assert cfg["networks"]["docker-api"]["internal"] is True
    # The hardening of every container (test_base_file_hardens_every_container), and a low pids
    # bound: the gate runs one process.
    assert gate["cap_drop"] == ["ALL"] and not gate.get("cap_add")
    assert gate["read_only"] is True
    assert "no-new-privileges:true" in gate["security_opt"]
    assert 0 < pids_limit(gate) <= 64
    env = gate["environment"]
    assert env["GATE_PROJECT"] == cfg["name"] == "celery-stack"
    assert "GATE_TOKEN" not in env
    assert mounted(cfg, GATE)[env["GATE_TOKEN_FILE"]] == values["SCALER_GATE_TOKEN"]
    # The workers' secret files are bind mounts from SECRETS_DIR: cloned, and nothing else.
    secrets_dir = secrets_dir_of(env_file)
    assert [m for m in env["GATE_ALLOWED_BIND_MOUNTS"].split(",") if m] == [secrets_dir]
    assert env["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    health = " ".join(gate["healthcheck"]["test"])
    assert "/_ping" in health and "Authorization" in health and "GATE_TOKEN_FILE" in health
    for name in SCALERS:
        svc = services[name]
        assert svc["environment"]["DOCKER_HOST"] == "tcp://gate:2375", name
        token_file = svc["environment"]["SCALER_GATE_TOKEN_FILE"]
        assert mounted(cfg, name)[token_file] == values["SCALER_GATE_TOKEN"], name
        assert svc["environment"]["SCALER_CLONE_ALLOWED_BIND_MOUNTS"] == secrets_dir, name
        assert svc["depends_on"][GATE]["condition"] == "service_healthy", name
    ports = set()
    for name in SCALERS:
        svc = services[name]
        assert svc["command"][:4] == ["scaler", "run", "--backend", "compose"], svc["command"]
        assert "--project" not in svc["command"], "the project comes from the gate's scope"
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
        token_file = svc["environment"]["SCALER_TOKEN_FILE"]
        assert mounted(cfg, name)[token_file] == values["SCALER_TOKEN"], "SCALER_TOKEN from .env"
        # Published from a network of the scalers' own (not from an internal one), and no
        # network shared with a worker: none can connect to the API (docs/security.md).
        assert set(svc["networks"]) == {"scaler-redis", "scaler-edge", "docker-api"}, name
        assert not {"DATABASE_URL", "DATABASE_URL_FILE"} & set(svc["environment"]), name
        assert not any("postgresql://" in v for v in mounted(cfg, name).values()), (
            f"{name} never talks to PostgreSQL"
        )
    for name, svc in services.items():
        if name not in SCALERS:
            assert "scaler-edge" not in svc.get("networks", {}), name
            assert ("scaler-redis" in svc.get("networks", {})) == (name == "redis"), name
    assert cfg["networks"]["scaler-redis"]["internal"] is True
    assert not cfg["networks"]["scaler-edge"].get("internal")
    assert ports == {"9808", "9809"}, "leader and standby need distinct host ports"
    assert services["scaler-standby"]["profiles"] == ["ha"]
    assert "profiles" not in services["scaler"], "the scaler is part of the default stack"


def test_the_project_follows_compose_s_project_name(env_file: Path) -> None:
    """`-p NAME` (or COMPOSE_PROJECT_NAME) is the gate's scope, so the scaler (which asks the gate)
    manages that project's workers and no other's."""
    env = {**os.environ, "DOCKER_GID": "4242"}
    for k in SECRET_VARS:
        env.pop(k, None)
    cmd = ["docker", "compose", "--env-file", str(env_file), "-p", "cst-other", "-f", str(BASE)]
    out = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    assert json.loads(out.stdout)["services"][GATE]["environment"]["GATE_PROJECT"] == "cst-other"


def test_each_secret_reaches_only_the_services_that_use_it(env_file: Path) -> None:
    """No service's definition (environment, command, labels: anything `docker inspect` shows)
    holds a password or token, and the secret files a service mounts hold only the secrets it
    uses: the gate's token only the gate and the scalers, the scalers' Redis password and control
    token only the scalers, and so on. Redis's definition holds the SHA-256 hashes only."""
    cfg = config(env_file, BASE)
    services = cfg["services"]
    values = env_values(env_file)
    for name, svc in services.items():
        definition = json.dumps(svc)
        shown = [var for var in PASSWORDS if values[var] in definition]
        assert not shown, f"{name}'s definition shows {shown}"
    celery = {
        n
        for n, svc in services.items()
        if "CELERY_BROKER_URL_FILE" in (svc.get("environment") or {}) and n not in SCALERS
    }
    assert {"migrate", "beat", "flower", *WORKERS} == celery
    expected = {
        "SCALER_GATE_TOKEN": {GATE, *SCALERS},
        "SCALER_TOKEN": set(SCALERS),
        "REDIS_SCALER_PASSWORD": set(SCALERS),
        "REDIS_WORKER_PASSWORD": celery,
        "REDIS_ADMIN_PASSWORD": set(),
        "POSTGRES_PASSWORD": {"postgres", "migrate"},
        "POSTGRES_APP_PASSWORD": celery,
        "FLOWER_PASSWORD": {"flower"},
        **{f"{v}_SHA256": {"redis"} for v in REDIS_USERS.values()},
    }
    for var, holders in expected.items():
        value = values[var]
        assert len(value) >= 16, var
        found = {
            n
            for n, svc in services.items()
            if value in json.dumps(svc) or any(value in v for v in mounted(cfg, n).values())
        }
        assert found == holders, f"{var}: held by {sorted(found)}, expected {sorted(holders)}"


def test_an_empty_scaler_token_names_no_file_and_disables_control(
    tmp_path: Path, env_file: Path
) -> None:
    """SCALER_TOKEN= in .env: the scalers get no SCALER_TOKEN_FILE (an empty file would be
    refused), so control is disabled, as the empty variable did before."""
    emptied = without(env_file, "SCALER_TOKEN", tmp_path)
    with emptied.open("a") as f:
        f.write("SCALER_TOKEN=\n")
    for name in SCALERS:
        assert config(emptied, BASE)["services"][name]["environment"]["SCALER_TOKEN_FILE"] == ""


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
    cfg = config(env_file, BASE)
    services = cfg["services"]
    values = env_values(env_file)
    redis_svc = json.dumps(services["redis"])
    for user, var in REDIS_USERS.items():
        assert values[var] not in redis_svc, f"the {user} password is visible in redis"
        assert f"#{values[var + '_SHA256']}" in services["redis"]["command"], user
    command = services["redis"]["command"]
    assert command[command.index("default") + 1] == "off", "the default user must be off"
    for name, svc in services.items():
        env = svc.get("environment") or {}
        files = mounted(cfg, name)
        keys = ("CELERY_BROKER_URL_FILE", "CELERY_RESULT_BACKEND_FILE")
        urls = [files[env[k]] for k in keys if k in env]
        assert len(urls) in (0, 2), name
        user = "scaler" if name in SCALERS else "worker"
        for url in urls:
            assert url.startswith(f"redis://{user}:{values[REDIS_USERS[user]]}@redis:"), name
        assert values["REDIS_ADMIN_PASSWORD"] not in json.dumps(svc), f"{name} holds admin"
        assert not any(values["REDIS_ADMIN_PASSWORD"] in v for v in files.values()), name


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
