"""What every benchmark gets: where the servers and files are, and how hard to try.

Benchmarks only talk to loopback and to containers they start themselves. The shared local Redis
is used with a key prefix of this run's own (never flushed); containers and Compose projects are
named ``cst-bench-...`` and removed when the benchmark ends, even on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTAINER_PREFIX = "cst-bench-"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _image(variable: str, official: str, local: str) -> str:
    """The image named by ``variable``, else the official tag, else the local stand-in if only it
    exists (this machine cannot pull: see the environment notes)."""
    chosen = os.environ.get(variable)
    if chosen:
        return chosen
    for tag in (official, local):
        probe = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
        if probe.returncode == 0:
            return tag
    return official


@dataclass
class Context:
    """Settings shared by the benchmarks of one ``python -m bench`` run."""

    redis_url: str
    run_id: str
    quick: bool = False
    root: Path = ROOT
    results_dir: Path = field(default_factory=lambda: ROOT / "bench" / "results")
    img_dir: Path = field(default_factory=lambda: ROOT / "docs" / "img")
    report_path: Path = field(default_factory=lambda: ROOT / "docs" / "benchmarks.md")
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def from_env(cls, *, quick: bool = False) -> Context:
        """REDIS_URL (default the local server on 127.0.0.1) and a fresh run id."""
        url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"REDIS_URL={url!r}: expected a redis:// or rediss:// URL")
        return cls(redis_url=url, run_id=uuid.uuid4().hex[:8], quick=quick)

    @property
    def key_prefix(self) -> str:
        """A Redis key prefix no other run or test uses (kombu's global_keyprefix)."""
        return f"cst-bench-{self.run_id}:"

    def name(self, what: str) -> str:
        """A container or Compose project name of this run: ``cst-bench-<what>-<run id>``."""
        return f"{CONTAINER_PREFIX}{what}-{self.run_id}"

    def python_image(self) -> str:
        return _image("PYTHON_IMAGE", "python:3.11-slim", "local/python:3.11")

    def redis_image(self) -> str:
        return _image("REDIS_IMAGE", "redis:7", "local/redis:7")

    def log(self, message: str) -> None:
        """Progress on stderr, with the time since the run started."""
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr)
