"""One Compose project of the stack under test, driven through the real `docker compose` CLI.

The e2e tests run the same compose files an operator does (compose/compose.yaml plus the
production override), under a unique project name prefixed ``cst-test-`` so that CI's cleanup
can find anything a crashed run leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from support.polling import poll_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
T = TypeVar("T")


def ensure_wheelhouse() -> None:
    """Refresh the host-built wheelhouse when stale: containers here cannot reach the index.

    Every test that builds the application image calls this first (whichever runs first).
    """
    if shutil.which("make") is None:
        return
    proc = subprocess.run(
        ["make", "--no-print-directory", "wheels", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        print(f"`make wheels` failed; the image build will try the index:\n{proc.stderr}")


def wait_until(
    what: str, probe: Callable[[], T | None], deadline_s: float, every_s: float = 0.5
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after the deadline
    (support.polling's poll_until, with any exception of the probe counting as "not yet")."""
    return poll_until(probe, what, deadline_s, every_s, errors=(Exception,))


def docker_engine_available() -> bool:
    """A Docker CLI and an engine that answers."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def fresh_env_file(directory: Path, settings: dict[str, str], *, check: bool = False) -> Path:
    """A new ``.env`` made by the script `make up` uses (fresh secrets), plus ``settings``, and
    its secret files, written as `make up` writes them into ``.env.secrets`` beside it (the env
    file names that directory, SECRETS_DIR, and their digest, SECRETS_DIGEST, as make hands
    them to Compose); ``check``: also passed through `make up`'s check (check-env.sh), or the
    test fails."""
    env_file = directory / ".env"
    subprocess.run(
        ["bash", str(ROOT / "compose/scripts/init-env.sh"), str(ROOT / ".env.example"), env_file],
        check=True,
        capture_output=True,
    )
    secrets_dir = secrets_dir_of(env_file)
    with env_file.open("a") as f:
        f.writelines(f"{k}={v}\n" for k, v in {"SECRETS_DIR": secrets_dir, **settings}.items())
    if check:
        result = subprocess.run(
            ["bash", str(ROOT / "compose/scripts/check-env.sh"), str(env_file)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    write_secrets(env_file)
    digest = subprocess.run(
        ["bash", str(ROOT / "compose/scripts/write-secrets.sh"), "--digest", secrets_dir],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with env_file.open("a") as f:
        f.write(f"SECRETS_DIGEST={digest}\n")
    return env_file


def secrets_dir_of(env_file: Path) -> str:
    """Where `make up` writes ``env_file``'s secret files (the Makefile's SECRETS_DIR)."""
    return f"{env_file.resolve()}.secrets"


def write_secrets(env_file: Path) -> None:
    """(Re)write the secret files of ``env_file`` as `make up` does (write-secrets.sh)."""
    script = str(ROOT / "compose/scripts/write-secrets.sh")
    subprocess.run(
        ["bash", script, str(env_file), secrets_dir_of(env_file)], check=True, capture_output=True
    )


def read_env(env_file: Path) -> dict[str, str]:
    """The NAME=value lines of an env file (comments left out; the last of a name wins)."""
    pairs = (line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a published port of the stack under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def docker_socket_gid(path: str = "/var/run/docker.sock") -> str:
    """The Docker socket's group id, which the gate's container joins (as `make up` does)."""
    explicit = os.environ.get("DOCKER_GID", "").strip()
    if explicit:
        return explicit
    try:
        return str(os.stat(path).st_gid)
    except OSError as exc:
        raise RuntimeError(f"DOCKER_GID: cannot stat the Docker socket {path}: {exc}") from None


@dataclass
class ComposeProject:
    """A named Compose project over the stack's files, with its own env file."""

    name: str
    env_file: Path
    files: Sequence[Path] = (COMPOSE_DIR / "compose.yaml", COMPOSE_DIR / "compose.prod.yaml")
    env: dict[str, str] = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        cmd = ["docker", "compose", "-p", self.name, "--env-file", str(self.env_file)]
        for f in self.files:
            cmd += ["-f", str(f)]
        return [*cmd, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one compose command; on failure raise with its stderr (the useful part)."""
        cmd = self.command(*args)
        proc = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env or None,
            timeout=timeout,
            cwd=ROOT,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-4000:]}"
            )
        return proc

    def container_ids(self, service: str) -> list[str]:
        out = self.run("ps", "--quiet", service).stdout
        return [line for line in out.split() if line]

    def inspect(self, container_ids: Sequence[str]) -> list[dict[str, Any]]:
        if not container_ids:
            return []
        out = subprocess.run(
            ["docker", "inspect", *container_ids], capture_output=True, text=True, check=True
        ).stdout
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def hostnames(self, service: str) -> set[str]:
        """The hostnames of the service's running containers (Celery names workers after them)."""
        return {c["Config"]["Hostname"] for c in self.inspect(self.container_ids(service))}

    def psql(self, sql: str) -> list[list[str]]:
        """Run one query in the postgres container (its port is not published) and split rows."""
        out = self.run(
            "exec",
            "-T",
            "postgres",
            "sh",
            "-c",
            'PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")" psql -h 127.0.0.1 -p 5432'
            ' -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -F "|" -c "$0"',
            sql,
        ).stdout
        return [line.split("|") for line in out.splitlines() if line]

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label=com.docker.compose.project={self.name}"
        listings = {
            "containers": ["docker", "ps", "-a", "-q", "--filter", label],
            "networks": ["docker", "network", "ls", "-q", "--filter", label],
            "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
        }
        return {
            kind: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            for kind, cmd in listings.items()
        }

    def diagnostics(self) -> str:
        """`ps` and the tail of every service's logs: printed when a test fails."""
        ps = self.run("ps", "--all", check=False, timeout=60)
        logs = self.run("logs", "--no-color", "--tail", "80", check=False, timeout=60)
        return (
            f"--- docker compose ps ({self.name})\n{ps.stdout}{ps.stderr}\n"
            f"--- docker compose logs ({self.name})\n{logs.stdout[-20000:]}{logs.stderr}"
        )

    def down(self) -> None:
        self.run(
            "--profile", "monitoring", "--profile", "ha",
            "down", "--volumes", "--remove-orphans", "-t", "20",
        )  # fmt: skip
