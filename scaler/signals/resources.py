"""Host and worker-process CPU and memory from psutil.

CPU percentages are read with ``interval=None``: psutil then reports the usage since the previous
call on the same object, so nothing in the cycle blocks (``interval=1`` would cost a second per
reading). The host's very first reading samples for 0.1 s once (so a one-shot `scaler plan` sees
the host); a new worker process's first reading has no previous call and is reported as missing.
``read_at`` is stamped from ``clock``, monotonic like the loop's ``now``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

from scaler.observations import Resources


@dataclass
class HostStats:
    """Whole-host CPU and memory, in percent."""

    clock: Callable[[], float] = time.monotonic
    first_sample_s: float = 0.1
    _primed: bool = field(default=False, init=False)

    def read(self) -> Resources:
        """CPU since the previous read (a short sample the first time) and memory in use now."""
        interval = None if self._primed else self.first_sample_s
        cpu = psutil.cpu_percent(interval=interval)
        self._primed = True
        memory = psutil.virtual_memory().percent
        return Resources(cpu, memory, read_at=self.clock())


@dataclass
class ProcessStats:
    """Mean CPU and memory of a set of process trees (a worker and its pool children).

    CPU is in percent of the whole host (psutil's per-process figure divided by the CPU count), so
    it is on the same scale as the host figure and the container figures of other backends.
    """

    clock: Callable[[], float] = time.monotonic
    _procs: dict[int, psutil.Process] = field(default_factory=dict, init=False)

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = psutil.Process(pid)
            proc.cpu_percent(interval=None)  # prime: the next call measures from here
        return proc

    def read(self, pids: Iterable[int]) -> Resources:
        """Mean over the trees rooted at ``pids``; missing when no tree could be read yet."""
        cpus: list[float] = []
        mems: list[float] = []
        seen: set[int] = set()
        ncpu = psutil.cpu_count() or 1
        for pid in pids:
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
                known = [p.pid in self._procs for p in tree]
                cpu = sum(self._process(p.pid).cpu_percent(interval=None) for p in tree)
                mem = sum(p.memory_percent() for p in tree)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            seen.update(p.pid for p in tree)
            mems.append(mem)
            if all(known):
                cpus.append(cpu / ncpu)
        for stale in set(self._procs) - seen:
            del self._procs[stale]
        return Resources(
            sum(cpus) / len(cpus) if cpus else None,
            sum(mems) / len(mems) if mems else None,
            read_at=self.clock(),
        )
