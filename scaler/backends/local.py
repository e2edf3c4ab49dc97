"""The local-process backend: Celery worker processes on this host, one group per service.

The seed's original model, kept for development without Docker and for fast tests of the whole
loop. Each worker runs as ``celery -A <app> worker -Q <queues> -n <service>-<N>@<host>`` with a
pidfile in the work directory, so a restarted scaler adopts the workers it left running.

Scale-down never kills work: the chosen worker (idle ones first) has its consumers cancelled
through Celery's control API, so it takes nothing new; once it runs and holds nothing (``inspect
active`` and ``reserved`` both empty) it gets SIGTERM, Celery's warm shutdown; only if it is still
alive after the grace period is it sent SIGQUIT (cold: acks_late tasks go back to the queue), then
SIGKILL. Drains run in background threads so one slow drain never stalls the loop.

A worker that dies soon after its start is a crash: consecutive crashes delay the service's next
start exponentially (``scaler.backends.restart_backoff``, shared with the Compose backend), and
while the delay runs neither a replacement nor a scale-up starts one.

A scaler that died mid-drain leaves a worker with its consumers cancelled: the first reconcile
after ``manage()`` asks the running workers which queues they consume and gives the ones that
consume none of their service's queues those queues back (``scaler.backends.stranded``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from scaler.backends.base import (
    BackendError,
    BackendEvent,
    BackendHealth,
    ScaleResult,
    ServiceSpec,
    WorkerInfo,
)
from scaler.backends.restart_backoff import RestartBackoff
from scaler.backends.stranded import restore_stranded
from scaler.observations import Resources
from scaler.restore import UnackedRestorer, restore_dead_workers
from scaler.signals.resources import ProcessStats

log = logging.getLogger(__name__)

POLL_S = 0.2


@dataclass
class LocalWorker:
    """One worker process, started by this backend or adopted from its pidfile."""

    service: str
    number: int
    name: str
    pid: int
    pidfile: Path
    popen: subprocess.Popen[bytes] | None = None  # None when adopted from an earlier run
    state: str = "running"
    log_file: IO[bytes] | None = None
    started_at: float | None = None  # the backend's clock at start; None when adopted

    def alive(self) -> bool:
        """True while the process runs (a zombie or a reaped child is dead)."""
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker's main process only (Celery forwards to its pool)."""
        if self.popen is not None and self.popen.poll() is not None:
            return  # reaped: the pid may belong to another process by now
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(POLL_S / 2)
        return not self.alive()


@dataclass
class LocalBackend:
    """Runs each managed service as a group of local Celery worker processes."""

    app: Any  # celery.Celery: the same app (and broker options) the workers use, for control
    workdir: Path
    app_module: str = "services.celery_app"
    env: Mapping[str, str] = field(default_factory=dict)
    concurrency: int = 1
    grace_s: float = 30.0
    control_timeout_s: float = 1.0
    loglevel: str = "INFO"
    hostname: str = field(default_factory=socket.gethostname)
    clock: Callable[[], float] = time.monotonic
    restart_backoff: RestartBackoff = field(default_factory=RestartBackoff)
    # Gives a dead worker's unacked messages back at once (scaler.restore); None: not Redis.
    restorer: UnackedRestorer | None = None
    name: str = "local"
    _specs: dict[str, ServiceSpec] = field(default_factory=dict, init=False)
    _workers: dict[str, list[LocalWorker]] = field(default_factory=dict, init=False)
    _events: list[BackendEvent] = field(default_factory=list, init=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _drains: list[threading.Thread] = field(default_factory=list, init=False)
    _stats: ProcessStats = field(default_factory=ProcessStats, init=False)
    _adopt_pending: bool = field(default=False, init=False)  # check consumers at next reconcile
    _restored: set[int] = field(default_factory=set, init=False)  # dead pids already restored

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency!r}")
        if self.grace_s <= 0:
            raise ValueError(f"grace_s must be > 0 seconds, got {self.grace_s!r}")
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- management -------------------------------------------------------------------------
    def manage(self, specs: Sequence[ServiceSpec]) -> None:
        """Manage ``specs``; adopt live workers whose pidfiles an earlier run left behind."""
        with self._lock:
            self._specs = {s.name: s for s in specs}
            for spec in specs:
                self._workers.setdefault(spec.name, [])
                self._adopt(spec.name)
            self._adopt_pending = True

    def begin_cycle(self) -> None:
        """Nothing to share: reads are the backend's own process table, cheap every time."""

    def _adopt(self, service: str) -> None:
        known = {w.pidfile for w in self._workers[service]}
        for pidfile in sorted(self.workdir.glob(f"{service}-*.pid")):
            number_text = pidfile.stem[len(service) + 1 :]
            if pidfile in known or not number_text.isdigit():
                continue
            try:
                pid = int(pidfile.read_text().strip())
                cmdline = " ".join(psutil.Process(pid).cmdline())
            except (ValueError, OSError, psutil.Error):
                continue
            name = f"{service}-{number_text}@{self.hostname}"
            if "celery" in cmdline and name in cmdline:
                worker = LocalWorker(service, int(number_text), name, pid, pidfile)
                self._workers[service].append(worker)
                log.info("adopted worker %s (pid %d)", name, pid)

    def services(self) -> list[str]:
        """Names of the managed services."""
        return list(self._specs)

    def workers(self, service: str) -> list[WorkerInfo]:
        """The service's workers, draining ones included."""
        with self._lock:
            return [
                WorkerInfo(service, w.name, str(w.pid), w.state if w.alive() else "dead")
                for w in self._group(service)
            ]

    def _group(self, service: str) -> list[LocalWorker]:
        if service not in self._specs:
            raise BackendError(f"service {service!r} is not managed (managed: {list(self._specs)})")
        return self._workers[service]

    def _running(self, service: str) -> list[LocalWorker]:
        return [w for w in self._group(service) if w.state == "running" and w.alive()]

    def replicas(self, service: str) -> int:
        """Running workers that are not draining."""
        with self._lock:
            return len(self._running(service))

    # -- scaling ----------------------------------------------------------------------------
    def scale(self, service: str, replicas: int) -> ScaleResult:
        """Start workers, or begin draining the idlest ones, to reach ``replicas``."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas!r}")
        with self._lock:
            running = self._running(service)
            before = len(running)
            if replicas > before:
                if not self.restart_backoff.may_start(service):
                    return ScaleResult(service, before, before)  # crash loop: see health()
                started = tuple(self._start(service).name for _ in range(replicas - before))
                return ScaleResult(service, before, replicas, started=started)
            if replicas == before:
                return ScaleResult(service, before, before)
            chosen = self._choose_for_removal(running, before - replicas)
            for worker in chosen:
                worker.state = "draining"
                thread = threading.Thread(
                    target=self._drain, args=(worker,), name=f"drain-{worker.name}", daemon=True
                )
                self._drains.append(thread)
                thread.start()
            return ScaleResult(service, before, replicas, draining=tuple(w.name for w in chosen))

    def _start(self, service: str) -> LocalWorker:
        spec = self._specs[service]
        used = {w.number for w in self._workers[service]}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        name = f"{service}-{number}@{self.hostname}"
        pidfile = self.workdir / f"{service}-{number}.pid"
        pidfile.unlink(missing_ok=True)  # a stale one from a killed worker would block the start
        command = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-Q", ",".join(spec.queues), "-n", name,
            "--concurrency", str(self.concurrency), "--loglevel", self.loglevel,
            "--pidfile", str(pidfile),
        ]  # fmt: skip
        log_file = (self.workdir / f"{service}-{number}.log").open("ab")
        try:
            popen = subprocess.Popen(
                command,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to the scaler is not a Ctrl-C to its workers
            )
        except OSError as exc:
            log_file.close()
            raise BackendError(f"could not start worker {name}: {exc}") from exc
        worker = LocalWorker(
            service, number, name, popen.pid, pidfile, popen, log_file=log_file,
            started_at=self.clock(),
        )  # fmt: skip
        self._workers[service].append(worker)
        self.restart_backoff.started(service)
        log.info("started worker %s (pid %d)", name, popen.pid)
        return worker

    def _choose_for_removal(self, running: list[LocalWorker], count: int) -> list[LocalWorker]:
        """Idle workers first (fewest running tasks), then the highest numbers."""
        busy = self._busy_counts([w.name for w in running]) or {}
        ranked = sorted(running, key=lambda w: (busy.get(w.name, 0), -w.number))
        return ranked[:count]

    def _busy_counts(self, names: list[str]) -> dict[str, int] | None:
        """Active plus reserved tasks per worker; None when the control API cannot be reached."""
        if not names:
            return {}
        try:
            inspect = self.app.control.inspect(
                destination=names, timeout=self.control_timeout_s, limit=len(names)
            )
            active = inspect.active() or {}
            reserved = inspect.reserved() or {}
        except Exception as exc:
            log.warning("inspect failed: %s", exc)
            return None
        replied = set(active) & set(reserved)
        return {n: len(active[n]) + len(reserved[n]) for n in names if n in replied}

    def _drain(self, worker: LocalWorker) -> None:
        """Cancel consumers, wait until idle, warm shutdown; escalate only past the grace."""
        spec = self._specs.get(worker.service)
        deadline = self.clock() + self.grace_s
        try:
            for queue in spec.queues if spec else ():
                self.app.control.cancel_consumer(
                    queue, destination=[worker.name], reply=True, timeout=self.control_timeout_s
                )
        except Exception as exc:
            log.warning("cancel_consumer for %s failed: %s", worker.name, exc)
        while self.clock() < deadline and worker.alive():
            busy = self._busy_counts([worker.name])
            if busy is not None and busy.get(worker.name) == 0:
                break
            time.sleep(POLL_S)
        worker.signal(signal.SIGTERM)
        kind, detail = "drained", "warm shutdown"
        if not worker.wait(max(self.grace_s, deadline - self.clock())):
            worker.signal(signal.SIGQUIT)
            kind, detail = "drain-timeout", f"still running after {self.grace_s}s: SIGQUIT"
            if not worker.wait(5.0):
                worker.signal(signal.SIGKILL)
                worker.wait(5.0)
                detail += ", then SIGKILL"
            with self._lock:
                self._restore_dead(worker)  # a cold or killed shutdown may leave messages
        self._forget(worker)
        with self._lock:
            self._events.append(BackendEvent(worker.service, kind, f"{worker.name}: {detail}"))
        log.info("worker %s stopped (%s)", worker.name, detail)

    def _forget(self, worker: LocalWorker) -> None:
        with self._lock:
            group = self._workers.get(worker.service, [])
            if worker in group:
                group.remove(worker)
        if worker.log_file is not None:
            worker.log_file.close()
        worker.pidfile.unlink(missing_ok=True)

    def reconcile(self) -> list[BackendEvent]:
        """Replace running workers that died (a crash loop waits out its backoff: the dead
        worker stays listed as dead until then); return what happened since the last call."""
        with self._lock:
            now = self.clock()
            for service in self._specs:
                dead = [w for w in self._workers[service] if w.state == "running" and not w.alive()]
                for worker in dead:
                    lifetime = None if worker.started_at is None else now - worker.started_at
                    self.restart_backoff.exited(service, str(worker.pid), lifetime)
                    if worker.pid not in self._restored:  # before its replacement (same name)
                        self._restore_dead(worker)
                if not dead or not self.restart_backoff.may_start(service):
                    continue
                for worker in dead:
                    self._forget(worker)
                    self._restored.discard(worker.pid)
                    self.restart_backoff.forget(service, str(worker.pid))
                    code = worker.popen.returncode if worker.popen else None
                    replacement = self._start(service)
                    self._events.append(
                        BackendEvent(
                            service,
                            "replaced",
                            f"{worker.name} died (exit {code}); started {replacement.name}",
                        )
                    )
            self._events.extend(self.restart_backoff.events())
            pending = self._adopt_pending
        restored = self._restore_stranded() if pending else []  # a broker round trip: unlocked
        with self._lock:
            events, self._events = [*self._events, *restored], []
        return events

    def _restore_dead(self, worker: LocalWorker) -> None:
        """Give back what a dead worker held, once per process (called under the lock)."""
        code = worker.popen.returncode if worker.popen else None
        why = f"pid {worker.pid} exited {code}" if code is not None else f"pid {worker.pid} gone"
        event = restore_dead_workers(self.restorer, worker.service, [worker.name], why)
        if event is None or event.kind != "restore-failed":
            self._restored.add(worker.pid)
        if event is not None:
            self._events.append(event)

    def _restore_stranded(self) -> list[BackendEvent]:
        """Give running workers that consume none of their queues those queues back (a drain
        cut short by a scaler's death); see scaler.backends.stranded for the rule."""
        with self._lock:
            service_of = {w.name: s for s in self._specs for w in self._running(s)}
            wanted = {name: self._specs[s].queues for name, s in service_of.items()}
        try:
            restores = restore_stranded(self.app, wanted, self.control_timeout_s)
        except Exception as exc:  # the broker: keep the check pending, try again next time
            log.warning("consumer check failed: %s", exc)
            detail = f"{type(exc).__name__}: {exc}; tried again at the next reconcile"
            return [BackendEvent(",".join(self._specs), "consumer-check-failed", detail)]
        with self._lock:
            self._adopt_pending = False
        return [
            BackendEvent(
                service_of[r.node],
                "consumers-restored" if r.confirmed else "consumers-restore-failed",
                r.detail,
            )
            for r in restores
        ]

    def resources(self, service: str) -> Resources:
        """Mean CPU and memory of the service's running worker process trees."""
        with self._lock:
            pids = [w.pid for w in self._running(service)]
        return self._stats.read(pids)

    def health(self) -> BackendHealth:
        """Always able to act while it can write its work directory."""
        writable = os.access(self.workdir, os.W_OK)
        with self._lock:
            draining = sum(w.state == "draining" for g in self._workers.values() for w in g)
        extra: dict[str, object] = {"draining": draining}
        crash_loops = self.restart_backoff.state()
        if crash_loops:
            extra["crash_loop"] = crash_loops
        return BackendHealth(
            ok=writable,
            detail="" if writable else f"work directory {self.workdir} is not writable",
            extra=extra,
        )

    def wait_for_drains(self, timeout_s: float) -> bool:
        """Wait for the drains in progress; True if all finished (for tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._drains):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._drains = [t for t in self._drains if t.is_alive()]
        return not self._drains

    def stop_all(self, timeout_s: float | None = None) -> None:
        """Warm-stop every worker (used when `scaler run` exits and by tests), then kill."""
        grace = self.grace_s if timeout_s is None else timeout_s
        with self._lock:
            everyone = [w for g in self._workers.values() for w in g]
        for worker in everyone:
            worker.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for worker in everyone:
            if not worker.wait(max(0.0, deadline - time.monotonic())):
                worker.signal(signal.SIGKILL)
                worker.wait(5.0)
            self._forget(worker)
        self.wait_for_drains(grace)

    def close(self) -> None:
        """Nothing held but log files of live workers; they stay open while the workers run."""
