"""Workers' and their machines' CPU and memory, as the workers report them (multi-host backends).

One engine's stats API sees only its own node, so on a swarm the scaler asks the workers
(``services.resource_report``: the ``resource_usage`` control command). One broadcast addressed
to the live workers, in a background thread at most every ``every_s`` (a worker that does not
answer costs the broadcast's timeout, never the cycle's), fills two tables: per worker (its CPU
in percent of its container's CPU limit, its memory in percent of its memory limit) and per
machine (whole-machine CPU and memory, from any worker on it). A reading older than
``stale_after_s`` is missing, never zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scaler.observations import Resources
from scaler.worker_contract import RESOURCE_COMMAND as COMMAND  # the workers' command

log = logging.getLogger(__name__)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class WorkerResources:
    """The latest reports, per worker and per machine (see the module docstring)."""

    app: Any
    timeout_s: float = 1.0
    every_s: float = 5.0
    stale_after_s: float = 20.0
    clock: Callable[[], float] = time.monotonic
    _workers: dict[str, Resources] = field(default_factory=dict, init=False)
    _machines: dict[str, Resources] = field(default_factory=dict, init=False)
    _last: float = field(default=float("-inf"), init=False)
    _running: threading.Thread | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    last_error: str = field(default="", init=False)

    def refresh(self, workers: Mapping[str, str]) -> None:
        """Ask ``workers`` (node name -> the machine it runs on) for a report, in the
        background, when the last request is ``every_s`` old and none is running."""
        now = self.clock()
        with self._lock:
            if not workers or now - self._last < self.every_s:
                return
            if self._running is not None and self._running.is_alive():
                return
            self._last = now
            self._running = threading.Thread(
                target=self._ask, args=(dict(workers),), name="worker-resources", daemon=True
            )
            self._running.start()

    def wait(self, timeout_s: float) -> None:
        """Wait for a running request (tests and one-off callers)."""
        with self._lock:
            running = self._running
        if running is not None:
            running.join(timeout_s)

    def mean(self, nodes: Iterable[str]) -> Resources:
        """Mean over the fresh reports of ``nodes``; fields None when none is fresh."""
        now = self.clock()
        with self._lock:
            fresh = [r for n in nodes if (r := self._workers.get(n)) and self._fresh(r, now)]
        cpus = [r.cpu_percent for r in fresh if r.cpu_percent is not None]
        mems = [r.memory_percent for r in fresh if r.memory_percent is not None]
        return Resources(
            sum(cpus) / len(cpus) if cpus else None,
            sum(mems) / len(mems) if mems else None,
            read_at=max((r.read_at for r in fresh), default=now),
        )

    def roomiest_node(self) -> Resources | None:
        """The fresh machine reading with the most room (lowest of its worse figure); None
        when no machine has a fresh, complete one."""
        now = self.clock()
        with self._lock:
            readings = [r for r in self._machines.values() if self._fresh(r, now)]
        readings = [r for r in readings if None not in (r.cpu_percent, r.memory_percent)]
        if not readings:
            return None
        return min(readings, key=lambda r: max(r.cpu_percent or 0.0, r.memory_percent or 0.0))

    def nodes(self) -> dict[str, dict[str, float | None]]:
        """Every machine's latest reading, for status."""
        now = self.clock()
        with self._lock:
            return {
                name: {"cpu_percent": r.cpu_percent, "memory_percent": r.memory_percent,
                       "age_s": round(now - r.read_at, 1)}
                for name, r in sorted(self._machines.items())
            }  # fmt: skip

    def _fresh(self, reading: Resources, now: float) -> bool:
        return now - reading.read_at <= self.stale_after_s

    def _ask(self, workers: dict[str, str]) -> None:
        try:
            replies = self.app.control.broadcast(
                COMMAND, destination=list(workers), reply=True,
                timeout=self.timeout_s, limit=len(workers),
            ) or []  # fmt: skip
        except Exception as exc:
            self.last_error = f"{COMMAND}: {type(exc).__name__}: {exc}"
            log.warning("worker resources unread: %s", self.last_error)
            return
        now = self.clock()
        with self._lock:
            for reply in replies:
                for node, body in reply.items():
                    if not isinstance(body, dict) or node not in workers:
                        continue
                    self._workers[node] = Resources(
                        _number(body.get("cpu_percent")), _number(body.get("memory_percent")),
                        read_at=now,
                    )  # fmt: skip
                    machine = Resources(
                        _number(body.get("host_cpu_percent")),
                        _number(body.get("host_memory_percent")),
                        read_at=now,
                    )
                    if machine.cpu_percent is not None or workers[node] not in self._machines:
                        self._machines[workers[node]] = machine
            for gone in set(self._workers) - set(workers):
                del self._workers[gone]
            self.last_error = ""
