"""The env file scripts that guard `make up`: fresh secrets, and validation that names the variable.

These run the real shell scripts (compose/scripts/init-env.sh, check-env.sh) on temporary files;
they need no Docker engine.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from compose_project import ROOT

INIT_ENV = ROOT / "compose" / "scripts" / "init-env.sh"
CHECK_ENV = ROOT / "compose" / "scripts" / "check-env.sh"
EXAMPLE = ROOT / ".env.example"
REDIS_USERS = ("REDIS_WORKER_PASSWORD", "REDIS_SCALER_PASSWORD", "REDIS_ADMIN_PASSWORD")
SECRETS = (
    *REDIS_USERS,
    "POSTGRES_PASSWORD",
    "POSTGRES_APP_PASSWORD",
    "FLOWER_PASSWORD",
    "SCALER_TOKEN",
    "SCALER_GATE_TOKEN",
)
# Variables the scripts read; cleared so that the developer's shell cannot leak into a test.
STACK_VARS = (
    *SECRETS,
    *(f"{name}_SHA256" for name in REDIS_USERS),
    "REDIS_MAXMEMORY",
    "FLOWER_USER",
    "LOG_LEVEL",
    "CELERY_TASK_TIME_LIMIT",
    "CELERY_TASK_SOFT_TIME_LIMIT",
    "CELERY_VISIBILITY_TIMEOUT",
    "WORKER_STOP_GRACE_SECONDS",
    "DB_POOL_MIN",
    "DB_POOL_MAX",
    "POSTGRES_USER",
    "POSTGRES_DB",
    "POSTGRES_APP_USER",
    "POSTGRES_MAX_CONNECTIONS",
    "CELERY_KEY_PREFIX",
    "GATE_ALLOWED_BIND_MOUNTS",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARS}
    env.update(extra)
    return env


def read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_][A-Z0-9_]*=", line))


def init_env(tmp_path: Path, name: str = ".env") -> Path:
    target = tmp_path / name
    subprocess.run(
        ["bash", str(INIT_ENV), str(EXAMPLE), str(target)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    return target


def check_env(path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CHECK_ENV), str(path)], capture_output=True, text=True, env=clean_env(**extra)
    )


def set_var(path: Path, name: str, value: str) -> None:
    text = path.read_text()
    text, n = re.subn(rf"(?m)^{name}=.*$", f"{name}={value}", text)
    assert n == 1, f"{name} is not in {path}"
    path.write_text(text)


def test_example_has_no_password_and_fails_validation(tmp_path: Path) -> None:
    """The committed example carries no usable secret: used as is, it is refused."""
    example_values = read_env(EXAMPLE)
    for name in SECRETS:
        assert example_values[name] == "", f"{name} has a default in .env.example"
    copy = tmp_path / ".env"
    copy.write_text(EXAMPLE.read_text())
    proc = check_env(copy)
    assert proc.returncode != 0
    for name in (*REDIS_USERS, "POSTGRES_PASSWORD", "POSTGRES_APP_PASSWORD", "FLOWER_PASSWORD"):
        assert f"{name} is missing or empty" in proc.stderr


def test_init_env_generates_distinct_fresh_secrets(tmp_path: Path) -> None:
    first = read_env(init_env(tmp_path, "a.env"))
    second = read_env(init_env(tmp_path, "b.env"))
    values = [first[name] for name in SECRETS] + [second[name] for name in SECRETS]
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in values), values
    assert len(set(values)) == len(values), "a secret was reused"
    assert (tmp_path / "a.env").stat().st_mode & 0o077 == 0, ".env is readable by others"
    assert check_env(tmp_path / "a.env").returncode == 0
    for name in REDIS_USERS:  # Redis is given only these (compose.yaml)
        assert first[f"{name}_SHA256"] == hashlib.sha256(first[name].encode()).hexdigest()


def test_init_env_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    target = init_env(tmp_path)
    before = target.read_text()
    init_env(tmp_path)
    assert target.read_text() == before


def test_init_env_appends_only_the_secrets_an_older_file_lacks(tmp_path: Path) -> None:
    """An .env from before the Redis users and the app role: `make up` adds what is missing,
    with the hashes Redis needs, and changes nothing that is there (the volumes use it)."""
    target = init_env(tmp_path)
    lacking = (
        "REDIS_SCALER_PASSWORD",
        "REDIS_SCALER_PASSWORD_SHA256",
        "POSTGRES_APP_PASSWORD",
        "SCALER_GATE_TOKEN",  # an .env from before the engine gate
    )
    older = [
        line for line in target.read_text().splitlines() if line.split("=", 1)[0] not in lacking
    ]
    target.write_text("\n".join(older) + "\n")
    kept = read_env(target)
    assert check_env(target).returncode != 0
    init_env(tmp_path)
    now = read_env(target)
    assert {k: now[k] for k in kept} == kept, "an existing value changed"
    assert set(now) - set(kept) == set(lacking)
    password = now["REDIS_SCALER_PASSWORD"]
    assert now["REDIS_SCALER_PASSWORD_SHA256"] == hashlib.sha256(password.encode()).hexdigest()
    assert check_env(target).returncode == 0, check_env(target).stderr


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("REDIS_WORKER_PASSWORD", "short", "REDIS_WORKER_PASSWORD is malformed"),
        # A changed password whose hash was not updated: Redis would refuse the service.
        ("REDIS_SCALER_PASSWORD", "0123456789abcdef0123", "REDIS_SCALER_PASSWORD_SHA256 does not"),
        ("REDIS_MAXMEMORY", "lots", "REDIS_MAXMEMORY='lots' is malformed"),
        ("REDIS_MAXMEMORY", "1mb", "REDIS_MAXMEMORY='1mb' is too small"),
        ("POSTGRES_PASSWORD", "has space in it 0123456789", "POSTGRES_PASSWORD is malformed"),
        ("POSTGRES_PASSWORD", "", "POSTGRES_PASSWORD is missing or empty"),
        ("FLOWER_USER", "ad:min", "FLOWER_USER='ad:min' is malformed"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not one of"),
        ("CELERY_TASK_TIME_LIMIT", "2m", "CELERY_TASK_TIME_LIMIT='2m' is malformed"),
        ("DB_POOL_MAX", "0", "DB_POOL_MAX='0' is malformed"),
        ("CELERY_TASK_TIME_LIMIT", "200", "CELERY_TASK_TIME_LIMIT=200 must be less than"),
        ("CELERY_VISIBILITY_TIMEOUT", "60", "must be less than CELERY_VISIBILITY_TIMEOUT=60"),
        ("CELERY_KEY_PREFIX", "a b", "CELERY_KEY_PREFIX='a b' is malformed"),
        ("POSTGRES_DB", "my-db", "POSTGRES_DB='my-db' is malformed"),
        ("POSTGRES_APP_PASSWORD", "", "POSTGRES_APP_PASSWORD is missing or empty"),
        ("POSTGRES_APP_USER", "celery", "POSTGRES_APP_USER='celery' equals POSTGRES_USER"),
        ("POSTGRES_MAX_CONNECTIONS", "5000", "POSTGRES_MAX_CONNECTIONS='5000' is out of range"),
        ("SCALER_GATE_TOKEN", "", "SCALER_GATE_TOKEN is missing or empty"),
        ("SCALER_GATE_TOKEN", "short", "SCALER_GATE_TOKEN is malformed"),
        ("GATE_ALLOWED_BIND_MOUNTS", "/srv/a, /", "GATE_ALLOWED_BIND_MOUNTS has '/'"),
        ("GATE_ALLOWED_BIND_MOUNTS", "srv/a", "GATE_ALLOWED_BIND_MOUNTS has 'srv/a'"),
        ("GATE_ALLOWED_BIND_MOUNTS", "/srv/../etc", "GATE_ALLOWED_BIND_MOUNTS has '/srv/../etc'"),
    ],
)
def test_check_env_names_the_bad_variable(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    target = init_env(tmp_path)
    set_var(target, name, value)
    proc = check_env(target)
    assert proc.returncode == 1
    assert expected in proc.stderr, proc.stderr


def test_exported_variable_wins_over_the_file(tmp_path: Path) -> None:
    """As for Compose itself: a value in the environment overrides the file's."""
    target = init_env(tmp_path)
    assert check_env(target).returncode == 0
    proc = check_env(target, LOG_LEVEL="chatty")
    assert proc.returncode == 1
    assert "LOG_LEVEL='chatty'" in proc.stderr


def test_missing_env_file_is_reported(tmp_path: Path) -> None:
    proc = check_env(tmp_path / "nope.env")
    assert proc.returncode == 1
    assert "nope.env not found" in proc.stderr


WRITE_SECRETS = ROOT / "compose" / "scripts" / "write-secrets.sh"


def write_secrets(env_file: Path, directory: Path) -> str:
    """write-secrets.sh as `make up` runs it; returns what it printed."""
    proc = subprocess.run(
        ["bash", str(WRITE_SECRETS), str(env_file), str(directory)],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def secrets_digest(directory: Path) -> str:
    return subprocess.run(
        ["bash", str(WRITE_SECRETS), "--digest", str(directory)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_write_secrets_derives_each_file_from_the_env_file_and_the_digest_follows(
    tmp_path: Path,
) -> None:
    """The files `make up` writes for compose.yaml's `secrets:`: the URLs of each Redis user and
    PostgreSQL role, the passwords and tokens, one value each; a password changed in the env
    file reaches its file and changes the digest (Compose then recreates the readers), an
    unchanged env file rewrites nothing."""
    env_file = init_env(tmp_path)
    directory = tmp_path / ".env.secrets"
    assert "wrote" in write_secrets(env_file, directory)
    v = read_env(env_file)
    files = {p.name: p.read_text() for p in directory.iterdir()}
    worker, scaler = v["REDIS_WORKER_PASSWORD"], v["REDIS_SCALER_PASSWORD"]
    assert files == {
        "broker_url_worker": f"redis://worker:{worker}@redis:6379/0",
        "result_backend_worker": f"redis://worker:{worker}@redis:6379/1",
        "broker_url_scaler": f"redis://scaler:{scaler}@redis:6379/0",
        "result_backend_scaler": f"redis://scaler:{scaler}@redis:6379/1",
        "database_url_app": (
            f"postgresql://celery_app:{v['POSTGRES_APP_PASSWORD']}@postgres:5432/celery"
        ),
        "database_url_owner": f"postgresql://celery:{v['POSTGRES_PASSWORD']}@postgres:5432/celery",
        "postgres_password": v["POSTGRES_PASSWORD"],
        "postgres_app_password": v["POSTGRES_APP_PASSWORD"],
        "scaler_token": v["SCALER_TOKEN"],
        "gate_token": v["SCALER_GATE_TOKEN"],
        "flower_basic_auth": f"admin:{v['FLOWER_PASSWORD']}",
    }
    assert v["REDIS_ADMIN_PASSWORD"] not in "".join(files.values()), "no service has admin"
    first = secrets_digest(directory)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert write_secrets(env_file, directory) == "", "nothing changed, nothing rewritten"
    assert secrets_digest(directory) == first

    set_var(env_file, "FLOWER_PASSWORD", "a-new-flower-password-0123")
    assert "flower_basic_auth" in write_secrets(env_file, directory)
    assert (directory / "flower_basic_auth").read_text() == "admin:a-new-flower-password-0123"
    assert secrets_digest(directory) != first
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], "no temp file"
