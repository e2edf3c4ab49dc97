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
