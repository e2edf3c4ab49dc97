"""A throwaway Compose project a benchmark drives, removed with its volumes when done.

Usable as a context manager: ``down -v`` runs on the way out whatever happened, and the project
name always starts with ``cst-bench-`` so a forgotten one is easy to find and remove.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import TracebackType

from bench.context import CONTAINER_PREFIX


class ComposeProject:
    """``docker compose -p <project> -f <file>`` with an environment of its own."""

    def __init__(self, project: str, file: Path, env: dict[str, str]) -> None:
        if not project.startswith(CONTAINER_PREFIX):
            raise ValueError(f"project={project!r}: expected a name starting {CONTAINER_PREFIX!r}")
        self.project = project
        self.file = file
        self.env = {**os.environ, **env}

    def run(self, *args: str, check: bool = True, timeout_s: float = 600) -> str:
        """One compose command; RuntimeError with its output when it fails and ``check``."""
        cmd = ["docker", "compose", "-p", self.project, "-f", str(self.file), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def up(self, scale: dict[str, int] | None = None, wait_timeout_s: int = 300) -> None:
        """``up -d --wait`` with ``--scale service=n`` for each entry."""
        args = ["up", "-d", "--wait", "--wait-timeout", str(wait_timeout_s)]
        for service, count in (scale or {}).items():
            args += ["--scale", f"{service}={count}"]
        self.run(*args, timeout_s=wait_timeout_s + 60)

    def port(self, service: str, inner: int) -> int:
        """The host port a service's ``inner`` port is published on."""
        return int(self.run("port", service, str(inner)).strip().rsplit(":", 1)[1])

    def containers(self) -> list[dict[str, object]]:
        """``compose ps`` rows (running containers of the project)."""
        out = self.run("ps", "--format", "json").strip()
        if out.startswith("["):  # Compose before 2.21 prints one array
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def down(self) -> None:
        self.run("down", "-v", "-t", "0", "--remove-orphans", check=False)

    def __enter__(self) -> ComposeProject:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()
