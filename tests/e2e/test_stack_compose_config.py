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
SECRET_VARS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")
ALL_PROFILES = ("monitoring", "ha")
SCALER_BINDS = {"/var/run/docker.sock", "/etc/scaler/policy.yaml"}

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
                continue  # the Docker socket and the read-only policy: the scalers only
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


def test_prod_override_adds_restart_limits_and_log_rotation(env_file: Path) -> None:
    base = config(env_file, BASE)["services"]
    prod = config(env_file, BASE, PROD)["services"]
    assert set(prod) == set(base), "the override adds or drops no service"
    for name in LONG_RUNNING:
        assert "restart" not in base[name], f"{name}: restart policy belongs to the override"
        assert prod[name]["restart"] == "unless-stopped", name
        limits = prod[name]["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and int(limits["memory"]) > 0, name
        assert prod[name]["logging"]["options"]["max-size"], name
    assert prod["migrate"]["restart"].startswith("on-failure")


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"])
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


def test_scaler_services_alone_hold_the_socket_and_publish_on_loopback(env_file: Path) -> None:
    services = config(env_file, BASE, env_extra={"DOCKER_GID": "987"})["services"]
    for name, svc in services.items():
        sockets = [v for v in svc.get("volumes", []) if v["target"] == "/var/run/docker.sock"]
        assert bool(sockets) == (name in SCALERS), f"{name}: Docker socket mount {sockets}"
    ports = set()
    for name in SCALERS:
        svc = services[name]
        assert svc["group_add"] == ["987"], name
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
