"""Container CPU and memory, read off the scaler cycle's critical path.

Polling the Docker stats endpoint costs about a second per container on this engine (the daemon
waits for its next collection tick, even with ``one_shot``), so a cycle must never do it. Instead
one daemon thread per container holds a streaming ``stats(stream=True)`` connection open; the
engine pushes a sample every second and the thread keeps the latest one. The cycle only reads
that dictionary: microseconds for dozens of containers.

Why a stream rather than the cgroup files: the stream needs nothing but the Docker API the backend
already uses (no host ``/sys/fs/cgroup`` mount into the scaler, no cgroup v1/v2 path guessing), and
the engine reports each sample together with the previous one, so CPU% comes from one message.

Scale: CPU is in percent of the CPUs the container may use (the whole host unless it has a CPU
limit), memory in percent of its memory limit (the host's memory unless limited), page cache
excluded as ``docker stats`` does. A sample older than ``stale_after_s`` is missing, never zero.
Samples are stamped (``read_at``) from ``clock``, monotonic like the loop's ``now``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from scaler.observations import Resources

log = logging.getLogger(__name__)

ApiFactory = Callable[[], docker.APIClient]


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def resources_from_sample(
    sample: Mapping[str, Any], cpu_limit: float | None, read_at: float
) -> Resources:
    """One decoded stats message -> CPU and memory percent (None where the message has no data).

    A stopped container's stream keeps sending messages with every figure zero or absent: those
    read as missing. ``cpu_limit`` is the container's CPU quota in CPUs (None when unlimited).
    """
    cpu = sample.get("cpu_stats") or {}
    pre = sample.get("precpu_stats") or {}
    usage = cpu.get("cpu_usage") or {}
    online = _number(cpu.get("online_cpus")) or float(len(usage.get("percpu_usage") or ()))
    total = _number(usage.get("total_usage"))
    pre_total = _number((pre.get("cpu_usage") or {}).get("total_usage"))
    system = _number(cpu.get("system_cpu_usage"))
    pre_system = _number(pre.get("system_cpu_usage"))
    cpu_percent: float | None = None
    if (
        online
        and total is not None
        and pre_total is not None
        and system is not None
        and pre_system is not None
        and system > pre_system
        and total >= pre_total
    ):
        host_share = (total - pre_total) / (system - pre_system)  # of all the host's CPUs
        available = min(cpu_limit, online) if cpu_limit else online
        cpu_percent = host_share * online / available * 100.0

    memory = sample.get("memory_stats") or {}
    mem_usage = _number(memory.get("usage"))
    mem_limit = _number(memory.get("limit"))
    memory_percent: float | None = None
    if mem_usage is not None and mem_limit:
        stats = memory.get("stats") or {}
        # cgroup v1 reports total_inactive_file, v2 inactive_file: cache the kernel can drop.
        inactive = _number(stats.get("total_inactive_file", stats.get("inactive_file"))) or 0.0
        used = mem_usage - inactive if inactive < mem_usage else mem_usage
        memory_percent = used / mem_limit * 100.0
    return Resources(cpu_percent, memory_percent, read_at=read_at)


@dataclass
class _Reader:
    """One container's streaming reader thread and the stop flag it checks between samples."""

    container_id: str
    stop: threading.Event
    thread: threading.Thread


class ContainerStats:
    """Background streaming stats readers, one per tracked container.

    ``track(ids)`` starts readers for new containers and stops those of containers no longer
    listed; ``latest``/``mean`` only read what the readers stored. Each reader owns its own API
    client (a streaming response holds its connection for as long as it runs, so readers cannot
    share one connection pool) and reconnects with backoff when the engine is unreachable; its
    samples go stale meanwhile and read as missing.
    """

    def __init__(
        self,
        api_factory: ApiFactory,
        *,
        stale_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_backoff_s: float = 10.0,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s={stale_after_s!r}: expected a positive number")
        self._api_factory = api_factory
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._max_backoff_s = max_backoff_s
        self._readers: dict[str, _Reader] = {}
        self._latest: dict[str, Resources] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def track(
        self, container_ids: Iterable[str], cpu_limits: Mapping[str, float | None] | None = None
    ) -> None:
        """Make the set of readers match ``container_ids`` (start new ones, stop gone ones).

        ``cpu_limits``: CPUs each container may use (None or absent: unlimited), read when its
        reader starts; CPU is then in percent of that limit.
        """
        wanted = set(container_ids)
        limits = cpu_limits or {}
        with self._lock:
            for cid in set(self._readers) - wanted:
                self._readers.pop(cid).stop.set()
                self._latest.pop(cid, None)
                self._errors.pop(cid, None)
            for cid in wanted - set(self._readers):
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._run,
                    args=(cid, limits.get(cid), stop),
                    name=f"stats-{cid[:12]}",
                    daemon=True,
                )
                self._readers[cid] = _Reader(cid, stop, thread)
                thread.start()

    def tracked(self) -> set[str]:
        """Ids of the containers with a reader."""
        with self._lock:
            return set(self._readers)

    def latest(self, container_id: str) -> Resources | None:
        """The newest sample for the container, or None if there is none fresh enough."""
        sample = self._latest.get(container_id)
        if sample is None or self._clock() - sample.read_at > self._stale_after_s:
            return None
        return sample

    def mean(self, container_ids: Iterable[str]) -> Resources:
        """Mean CPU and memory over the containers with fresh samples; None when none has one."""
        cpus: list[float] = []
        mems: list[float] = []
        for cid in container_ids:
            sample = self.latest(cid)
            if sample is None:
                continue
            if sample.cpu_percent is not None:
                cpus.append(sample.cpu_percent)
            if sample.memory_percent is not None:
                mems.append(sample.memory_percent)
        return Resources(
            sum(cpus) / len(cpus) if cpus else None,
            sum(mems) / len(mems) if mems else None,
            read_at=self._clock(),
        )

    def errors(self) -> dict[str, str]:
        """The last error of each reader that is currently failing, by container id."""
        return dict(self._errors)

    def close(self) -> None:
        """Stop every reader (each exits at its next sample or read timeout; they are daemons)."""
        self.track(())

    def _run(self, container_id: str, cpu_limit: float | None, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            api: docker.APIClient | None = None
            try:
                api = self._api_factory()
                for message in api.stats(container_id, stream=True, decode=True):
                    if stop.is_set():
                        return
                    sample = resources_from_sample(message, cpu_limit, self._clock())
                    if sample.cpu_percent is not None or sample.memory_percent is not None:
                        self._latest[container_id] = sample
                    self._errors.pop(container_id, None)
                    backoff = 0.5
            except docker.errors.NotFound:
                return  # the container is gone: track() will drop it
            except Exception as exc:
                # requests', urllib3's or http.client's errors; a reader must retry, never die.
                self._errors[container_id] = f"{type(exc).__name__}: {exc}"
                log.debug("stats stream for %s failed: %s", container_id[:12], exc)
            finally:
                if api is not None:
                    api.close()
            stop.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
