"""The facts about this machine and the software under test that every figure depends on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import psutil


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command(*args: str) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    return proc.stdout.strip() if proc.returncode == 0 else "unavailable"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """CPU, memory, kernel and the versions of Python, Celery, kombu, redis-py, Docker, Compose."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis_py": _version("redis"),
        "docker_sdk": _version("docker"),
        "docker_engine": _command("docker", "version", "--format", "{{.Server.Version}}"),
        "compose": _command("docker", "compose", "version", "--short"),
        "redis_server": _command("redis-server", "--version"),
    }
