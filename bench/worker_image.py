"""Builds the benchmarks' small Celery worker image, once per set of inputs.

The tag is a hash of the Dockerfile, the worker app, the pinned packages and the base image, so a
second run reuses the image and a change rebuilds it. Wheels are built on the host (its pip reaches
the index; containers here cannot), from the project's .wheelhouse first when it exists.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "idle_worker"
FILES = ("Dockerfile", "worker_app.py")


def _pins() -> list[str]:
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("celery", "redis", "packaging")]
    pins.append("async-timeout>=4.0.3")  # redis needs it below Python 3.11.3 (Debian's 3.11.2)
    return pins


def worker_image(python_image: str, root: Path) -> str:
    """The tag of the idle worker image, built if it does not exist yet."""
    pins = _pins()
    digest = hashlib.sha256()
    for name in FILES:
        digest.update((FIXTURE / name).read_bytes())
    digest.update(" ".join([*pins, python_image]).encode())
    tag = f"cst-bench-worker:{digest.hexdigest()[:12]}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    with tempfile.TemporaryDirectory(prefix="cst-bench-ctx-") as ctx:
        for name in FILES:
            (Path(ctx) / name).write_bytes((FIXTURE / name).read_bytes())
        wheelhouse = root / ".wheelhouse"
        links = ["--find-links", str(wheelhouse)] if wheelhouse.is_dir() else []
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "-w", str(Path(ctx) / "wheels"), *links, *pins],
            check=True,
        )  # fmt: skip
        build = subprocess.run(
            ["docker", "build", "-q", "--build-arg", f"PYTHON_IMAGE={python_image}",
             "-t", tag, ctx],
            capture_output=True, text=True,
        )  # fmt: skip
        if build.returncode != 0:
            raise RuntimeError(f"docker build of {tag} from {python_image} failed:\n{build.stderr}")
    return tag
