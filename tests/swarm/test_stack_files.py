"""compose/stack.yaml and compose/scripts/swarm.sh checked without a cluster: the Swarm stack keeps
compose.yaml's Redis users and the hardening the 3.8 stack format can carry."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import ROOT

COMPOSE = ROOT / "compose"


def _env_file(tmp_path: Path) -> Path:
    target = tmp_path / ".env"
    subprocess.run(
        ["bash", str(COMPOSE / "scripts/init-env.sh"), str(ROOT / ".env.example"), str(target)],
        check=True,
        capture_output=True,
    )
    return target


def _compose_redis_users(env: dict[str, str]) -> dict[str, str]:
    """name -> rules of the `--user` arguments of compose.yaml's redis command."""
    command = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]["redis"]["command"]
    users: dict[str, list[str]] = {}
    args = iter(str(arg) for arg in command)
    current: list[str] | None = None
    for arg in args:
        if arg == "--user":
            current = users.setdefault(next(args), [])
        elif arg.startswith("--"):
            current = None
        elif current is not None:
            current.append(arg)
    resolved = {}
    for name, rules in users.items():
        text = " ".join(rules)
        text = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: env[m.group(1)], text)
        resolved[name] = text
    return resolved


def test_the_swarm_redis_acl_has_compose_yamls_users(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path)
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
               if line and not line.startswith("#") and "=" in line)  # fmt: skip
    proc = subprocess.run(
        [str(COMPOSE / "scripts/swarm.sh"), "acl"],
        env={**os.environ, "ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
        check=True,
    )
    acl = {}
    for line in proc.stdout.splitlines():
        _, name, rules = line.split(" ", 2)
        acl[name] = rules
    assert acl == _compose_redis_users(env)
    for secret in ("REDIS_WORKER_PASSWORD", "REDIS_SCALER_PASSWORD", "REDIS_ADMIN_PASSWORD"):
        assert env[secret] not in proc.stdout  # hashes only


def test_swarm_sh_names_a_bad_setting(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path)
    text = env_file.read_text()
    bad_hash = "REDIS_WORKER_PASSWORD_SHA256=x"
    env_file.write_text(re.sub(r"^REDIS_WORKER_PASSWORD_SHA256=.*$", bad_hash, text, flags=re.M))
    proc = subprocess.run(
        [str(COMPOSE / "scripts/swarm.sh"), "acl"],
        env={**os.environ, "ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "REDIS_WORKER_PASSWORD_SHA256='x'" in proc.stderr
    bad = subprocess.run(
        [str(COMPOSE / "scripts/swarm.sh"), "status"],
        env={**os.environ, "SWARM_STACK": "Bad Name"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "SWARM_STACK='Bad Name'" in bad.stderr


@pytest.mark.parametrize("service", ["worker-default", "worker-cpu", "worker-io", "worker-priority",
                                     "worker-scheduled"])  # fmt: skip
def test_worker_services_keep_the_safe_scale_down_contract(service: str) -> None:
    stack: dict[str, Any] = yaml.safe_load((COMPOSE / "stack.yaml").read_text())
    spec = stack["services"][service]
    assert spec["deploy"]["restart_policy"]["condition"] == "on-failure"
    assert spec["deploy"]["labels"]["autoscale.managed"] == "true"
    assert "hostname" not in spec
    grace = int(
        re.sub(r"\$\{WORKER_STOP_GRACE_SECONDS:-(\d+)\}s", r"\1", spec["stop_grace_period"])
    )
    limit = int(re.sub(r"\$\{CELERY_TASK_TIME_LIMIT:-(\d+)\}", r"\1",
                       str(spec["environment"]["CELERY_TASK_TIME_LIMIT"])))  # fmt: skip
    assert grace > limit
    assert spec["cap_drop"] == ["ALL"] and spec["read_only"] is True
    resources = spec["deploy"]["resources"]
    assert resources["limits"] and resources["reservations"]
    assert not [k for k in spec["environment"] if "PASSWORD" in k and not k.endswith("_FILE")]


def test_the_overlays_are_encrypted_and_the_backend_is_closed() -> None:
    stack: dict[str, Any] = yaml.safe_load((COMPOSE / "stack.yaml").read_text())
    networks = stack["networks"]
    for name in ("backend", "docker-api", "ops"):
        assert networks[name]["driver"] == "overlay"
        assert networks[name]["driver_opts"] == {"encrypted": ""}, name
    assert networks["backend"]["attachable"] is False and networks["backend"]["internal"] is True
    assert networks["ops"]["attachable"] is True
    published = [s for s, spec in stack["services"].items() if spec.get("ports")]
    assert published == []


def test_one_policy_file_drives_compose_and_swarm_alike() -> None:
    """The same shipped policy: compose.yaml mounts compose/scaler-policy.yaml into the Compose
    scaler, stack.yaml ships that file (by default) as the Swarm scaler's config, and every
    service the policy names is an opted-in worker service in both files, consuming the queue
    the policy says, so each backend finds what the policy names."""
    from scaler.policy import load_policy

    policy = load_policy(COMPOSE / "scaler-policy.yaml")
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]
    stack = yaml.safe_load((COMPOSE / "stack.yaml").read_text())
    (mount,) = [v for v in compose["scaler"]["volumes"] if v["target"] == "/etc/scaler/policy.yaml"]
    assert mount["source"].endswith("./scaler-policy.yaml}"), mount
    assert stack["configs"]["scaler_policy"]["file"].endswith("./scaler-policy.yaml}")
    (config,) = stack["services"]["scaler"]["configs"]
    assert config["source"] == "scaler_policy" and config["target"] == "/etc/scaler/policy.yaml"
    assert "--backend" in stack["services"]["scaler"]["command"]
    assert stack["services"]["scaler"]["command"][-1] == "/etc/scaler/policy.yaml"
    for name, svc in policy.services.items():
        (queue,) = svc.queues
        in_compose, in_stack = compose[name], stack["services"][name]
        assert in_compose["labels"]["autoscale.managed"] == "true", name
        assert in_stack["deploy"]["labels"]["autoscale.managed"] == "true", name
        assert in_compose["environment"]["WORKER_QUEUE"] == queue, name
        assert in_stack["environment"]["WORKER_QUEUE"] == queue, name


def test_the_engine_gate_is_the_only_holder_of_the_managers_sockets() -> None:
    """The gate on every manager (docs/gate.md), hardened as the other services, scoped to the
    stack the scaler serves, with its token from a Swarm secret the scalers read too, on the
    docker-api network only; no other service mounts the socket, docker-proxy is gone, and the
    scalers reach the engine at the gate."""
    stack: dict[str, Any] = yaml.safe_load((COMPOSE / "stack.yaml").read_text())
    services = stack["services"]
    assert "docker-proxy" not in services and not (COMPOSE / "docker-proxy").exists()
    gate, scaler = services["gate"], services["scaler"]
    assert gate["image"] == services["migrate"]["image"]  # the app image
    assert gate["command"] == ["python", "-m", "scaler.gate"]
    deploy = gate["deploy"]
    assert deploy["mode"] == "global" and deploy["endpoint_mode"] == "dnsrr"
    assert deploy["placement"]["constraints"] == ["node.role == manager"]
    assert deploy["labels"]["autoscale.managed"] == "false"
    assert deploy["resources"]["limits"]["memory"] and deploy["resources"]["limits"]["cpus"]
    assert gate["cap_drop"] == ["ALL"] and "cap_add" not in gate and gate["read_only"] is True
    assert re.fullmatch(r"10001:\$\{DOCKER_GID:\?[^}]+\}", gate["user"]), gate["user"]
    sockets = {
        name: [v for v in spec.get("volumes", []) if "docker.sock" in str(v.get("source"))]
        for name, spec in services.items()
    }
    assert {name for name, mounts in sockets.items() if mounts} == {"gate"}
    assert sockets["gate"] == [{"type": "bind", "source": "/var/run/docker.sock",
                                "target": "/var/run/docker.sock", "read_only": True}]  # fmt: skip
    assert gate["networks"] == ["docker-api"]
    env = gate["environment"]
    stack_name = "${SWARM_STACK:-celery}"
    assert env["GATE_STACK"] == scaler["environment"]["SCALER_SWARM_STACK"] == stack_name
    assert "GATE_TOKEN" not in env and "GATE_PROJECT" not in env
    assert scaler["environment"]["DOCKER_HOST"] == "tcp://gate:2375"
    # One secret, the same file name in both: the gate's token is the scalers' token.
    for spec, variable in ((gate, "GATE_TOKEN_FILE"), (scaler, "SCALER_GATE_TOKEN_FILE")):
        (secret,) = [s for s in spec["secrets"] if s["source"] == "gate_token"]
        assert spec["environment"][variable] == f"/run/secrets/{secret['target']}"
        assert (secret["uid"], secret["mode"]) == ("10001", 0o400), secret
    health = " ".join(gate["healthcheck"]["test"])
    assert "/_ping" in health and "GATE_TOKEN_FILE" in health and "Bearer" in health
    on_docker_api = {n for n, spec in services.items() if "docker-api" in spec.get("networks", [])}
    assert on_docker_api == {"gate", "scaler"}
    assert stack["networks"]["docker-api"]["internal"] is True
    assert stack["networks"]["docker-api"]["attachable"] is False
    assert "DOCKER_PROXY_IMAGE" not in (ROOT / ".env.example").read_text()


def test_swarm_sh_creates_every_secret_the_stack_names() -> None:
    """Each external secret of stack.yaml (<stack>_<name>) is one `create_secret <name>` of
    swarm.sh's `secrets` command, the gate's token from .env's SCALER_GATE_TOKEN among them."""
    stack: dict[str, Any] = yaml.safe_load((COMPOSE / "stack.yaml").read_text())
    script = (COMPOSE / "scripts/swarm.sh").read_text()
    created = set(re.findall(r"^\s*create_secret (\w+) ", script, flags=re.M))
    named = set(stack["secrets"])
    assert created == named
    for name, secret in stack["secrets"].items():
        assert secret == {"external": True, "name": f"${{SWARM_STACK:-celery}}_{name}"}, name
    assert re.search(r"gate_token=\$\(require SCALER_GATE_TOKEN\)", script)
    assert re.search(r'create_secret gate_token "\$gate_token"', script)
