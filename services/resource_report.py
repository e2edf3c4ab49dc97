"""Workers report their own CPU and memory, and their machine's, over Celery's control API.

On one host the scaler reads each container's stats from the engine. On a swarm it cannot: one
engine's stats API sees only the containers of its own node. The worker itself can always tell:
the ``resource_usage`` control command answers with its process tree's CPU and memory (on the
scale of its container's limits, like ``docker stats``) and its machine's CPU and memory (a
container sees the machine's /proc/stat and /proc/meminfo), so one broadcast from the scaler
reads every replica and every node that runs one, wherever they are.

CPU is measured since the previous request (psutil's ``interval=None``): the first answer of a
process has no CPU figure (None), never a made-up zero. Self-contained (psutil and Celery).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psutil
from celery.worker.control import control_command

COMMAND = "resource_usage"  # scaler.worker_contract.RESOURCE_COMMAND
CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_limit(root: Path = CGROUP) -> float | None:
    """The container's CPU limit in CPUs from its cgroup (v2 ``cpu.max``, v1 CFS quota), or
    None when unlimited or unreadable."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period.isdigit() and quota.isdigit() and int(period):
            return int(quota) / int(period)
        return None
    for d in ("cpu", "cpu,cpuacct"):
        cfs_quota = _read(root / d / "cpu.cfs_quota_us")
        cfs_period = _read(root / d / "cpu.cfs_period_us")
        if cfs_quota and cfs_period and cfs_quota.lstrip("-").isdigit() and cfs_period.isdigit():
            if int(cfs_quota) > 0 and int(cfs_period) > 0:
                return int(cfs_quota) / int(cfs_period)
            return None
    return None


def memory_limit(root: Path = CGROUP) -> int | None:
    """The container's memory limit in bytes, or None when unlimited (or above the machine's)."""
    raw = _read(root / "memory.max") or _read(root / "memory" / "memory.limit_in_bytes")
    if raw is None or not raw.isdigit():
        return None
    limit = int(raw)
    return limit if limit < psutil.virtual_memory().total else None


class Reporter:
    """Keeps the psutil objects between requests, so each CPU figure covers the interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, psutil.Process] = {}
        self._host_primed = False
        self._cpus = cpu_limit()
        self._memory = memory_limit()

    def report(self) -> dict[str, Any]:
        with self._lock:
            host_cpu = psutil.cpu_percent(interval=None) if self._host_primed else None
            self._host_primed = True
            cpu, rss = self._tree()
        ncpu = self._cpus or float(psutil.cpu_count() or 1)
        total = self._memory or psutil.virtual_memory().total
        return {
            "cpu_percent": None if cpu is None else cpu / ncpu,
            "memory_percent": 100.0 * rss / total,
            "host_cpu_percent": host_cpu,
            "host_memory_percent": psutil.virtual_memory().percent,
            "pid": os.getpid(),
        }

    def _tree(self) -> tuple[float | None, int]:
        """CPU (percent of one CPU) since the last request, None when any process is new; RSS."""
        root = psutil.Process(os.getpid())
        tree = [root, *root.children(recursive=True)]
        cpu: float | None = 0.0
        rss = 0
        seen: set[int] = set()
        for proc in tree:
            try:
                known = self._procs.get(proc.pid)
                if known is None:
                    known = self._procs[proc.pid] = proc
                    known.cpu_percent(interval=None)
                    cpu = None
                elif cpu is not None:
                    cpu += known.cpu_percent(interval=None)
                rss += proc.memory_info().rss
                seen.add(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for gone in set(self._procs) - seen:
            del self._procs[gone]
        return cpu, rss


_REPORTER: Reporter | None = None


@control_command()
def resource_usage(state: Any, **kwargs: Any) -> dict[str, Any]:
    """This worker's CPU and memory and its machine's (services.resource_report)."""
    global _REPORTER
    if _REPORTER is None:
        _REPORTER = Reporter()
    return _REPORTER.report()
