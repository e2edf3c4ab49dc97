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

A worker left consuming nothing (a scaler that died mid-drain, a broker reconnect that lost the
consumer): every reconcile asks the serving workers which queues they consume and gives the ones
that consume none of their service's queues those queues back; one still consuming none at the
next check is replaced like an unresponsive one (``scaler.backends.stranded``).

Each worker touches a heartbeat file of its own (``<service>-<N>.heartbeat`` in the work
directory, through WORKER_HEARTBEAT_FILE: ``services.heartbeat``) while it consumes. One whose
file is older than its service's ``unresponsive_after_s`` is replaced: drained if it answers a
ping, else SIGTERM, and SIGKILL of its whole process tree past the grace period; its unacked
messages are restored, then a new worker starts. A worker that never wrote the file is left
alone (its app may not have the heartbeat step).

Every start and every signal checks the action's fence first (``scaler.fencing``): a drain or a
replacement begun under a lease that is gone stops where it is, and the worker counts as running
again (the next leader's adoption gives it its queues back if the cancel had reached it).

The warm pool (``scaler.backends.warm_pool``): members are node names in the pool store; a
worker started for the pool gets ``WORKER_WARM_START=1`` (it boots consuming nothing) and is
recorded before it starts. ``replicas()`` counts serving workers only, ``warm()`` the members
plus drains returning to the pool. A pool member that dies is dropped, not replaced (the next
decision refills the pool), and is never judged by its heartbeat nor given its queues back.
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
from functools import partial
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
from scaler.backends.removal import removal_order
from scaler.backends.restart_backoff import RestartBackoff
from scaler.backends.stranded import CHECK_FAILED, ConsumerCheck
from scaler.backends.warm_pool import (
    WARM_ENV,
    PoolStore,
    WarmPool,
    commit_count,
    pool_room,
    pool_target,
    set_consumers,
    trim_order,
)
from scaler.fencing import UNFENCED, Fence, LeadershipLost
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

    def kill_tree(self) -> None:
        """SIGKILL the main process and every descendant: a frozen prefork pool's children
        would otherwise stay behind, stopped, once their parent is gone."""
        if self.popen is not None and self.popen.poll() is not None:
            return
        try:
            family = [*psutil.Process(self.pid).children(recursive=True), psutil.Process(self.pid)]
        except psutil.Error:
            return
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(POLL_S / 2)
        return not self.alive()


def _number(worker: LocalWorker) -> int:
    return worker.number


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
    # Where warm-pool membership lives (a RedisPoolStore survives restarts); None: in memory.
    pool_store: PoolStore | None = None
    _pool: WarmPool = field(init=False)
    _specs: dict[str, ServiceSpec] = field(default_factory=dict, init=False)
    _workers: dict[str, list[LocalWorker]] = field(default_factory=dict, init=False)
    _events: list[BackendEvent] = field(default_factory=list, init=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _drains: list[threading.Thread] = field(default_factory=list, init=False)
    _stats: ProcessStats = field(default_factory=ProcessStats, init=False)
    _adopt_pending: bool = field(default=False, init=False)  # check consumers at next reconcile
    _restored: set[int] = field(default_factory=set, init=False)  # dead pids already restored
    # Pool members per service as the last reconcile read them (for the rules it applies).
    _members_known: dict[str, set[str]] = field(default_factory=dict, init=False)
    _consumers: ConsumerCheck = field(init=False)  # the standing consumer check

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency!r}")
        if self.grace_s <= 0:
            raise ValueError(f"grace_s must be > 0 seconds, got {self.grace_s!r}")
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._pool = WarmPool(self.app, timeout_s=self.control_timeout_s)
        self._consumers = ConsumerCheck(self.app, self.control_timeout_s)
        if self.pool_store is not None:
            self._pool.store = self.pool_store

    def use_pool_store(self, store: PoolStore) -> None:
        """Keep warm-pool membership in ``store`` (Redis: survives restarts and leader changes)."""
        self.pool_store = self._pool.store = store

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
        """Running workers that are not draining and not in the warm pool."""
        members = self._pool.members(service)
        with self._lock:
            return sum(w.name not in members for w in self._running(service))

    def warm(self, service: str) -> int:
        """Warm-pool members alive (booting or booted) plus drains returning to the pool."""
        members = self._pool.members(service)
        with self._lock:
            group = self._group(service)
            pooling = sum(w.state == "pooling" and w.alive() for w in group)
            return pooling + sum(w.name in members for w in self._running(service))

    # -- scaling ----------------------------------------------------------------------------
    def scale(
        self, service: str, replicas: int, fence: Fence = UNFENCED, warm: int | None = None
    ) -> ScaleResult:
        """Promote warm workers, then start cold ones; or begin draining the idlest ones (back
        to the pool while it is short of ``warm``); then size the pool to ``warm``."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas!r}")
        if warm is not None and warm < 0:
            raise ValueError(f"warm must be >= 0 or None, got {warm!r}")
        members = self._pool.members(service)
        with self._lock:
            running = self._running(service)
            serving = [w for w in running if w.name not in members]
            pool = [w for w in running if w.name in members]
            before = len(serving)
            promoted: list[str] = []
            committed: list[str] = []
            started: list[str] = []
            draining: list[str] = []
            to_pool: list[str] = []
            if replicas > before:
                queues = self._specs[service].queues
                for worker in pool:  # ready ones only: a booting one is not promoted
                    if len(promoted) == replicas - before:
                        break
                    if self._pool.node(worker.name) is None:
                        continue
                    if self._pool.promote(service, worker.name, queues, fence) is None:
                        promoted.append(worker.name)
                need = replicas - before - len(promoted)
                if need and warm is not None:
                    # Booting members the pool is about to lose serve instead (WarmPool.commit):
                    # no cold worker beside one being stopped, serving + warm within max.
                    rest = [w for w in pool if w.name not in promoted]
                    pooling = sum(w.state == "pooling" for w in self._group(service))
                    booting = [w for w in rest if self._pool.node(w.name) is None]
                    taking = commit_count(need, len(booting), len(rest) + pooling, warm)
                    for worker in booting[:taking]:
                        # A local worker's node name is its name.
                        resolve = partial(str, worker.name)
                        if self._pool.commit(service, worker.name, resolve, queues, fence):
                            committed.append(worker.name)
                    need -= len(committed)
                if need and self.restart_backoff.may_start(service):  # else crash loop: health()
                    started = [self._start(service, fence).name for _ in range(need)]
            elif replicas < before:
                pooling = sum(w.state == "pooling" for w in self._group(service))
                room = pool_room(warm, len(pool) + pooling) if warm is not None else 0
                for worker in self._choose_for_removal(serving, before - replicas):
                    if len(to_pool) < room:
                        self._spawn(self._drain_to_pool, worker, fence, state="pooling")
                        to_pool.append(worker.name)
                    else:
                        self._spawn(self._drain, worker, fence)
                        draining.append(worker.name)
            taken = (*promoted, *committed)
            after = before + len(taken) + len(started) - len(draining) - len(to_pool)
            if warm is not None:  # busy workers a scale-down could not remove take the pool's room
                warm = pool_target(warm, after, replicas)
            warm_started, warm_stopped = (
                self._size_pool(service, [w for w in pool if w.name not in taken], warm, fence)
                if warm is not None
                else ((), ())
            )
        return ScaleResult(
            service, before, after, started=(*taken, *started), draining=tuple(draining),
            promoted=tuple(promoted), committed=tuple(committed), to_pool=tuple(to_pool),
            warm_started=warm_started, warm_stopped=warm_stopped,
        )  # fmt: skip

    def _size_pool(
        self, service: str, pool: list[LocalWorker], warm: int, fence: Fence
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Refill the pool with workers started warm, or stop the excess (booting ones first);
        drains on their way back count as members (called under the lock)."""
        have = len(pool) + sum(w.state == "pooling" for w in self._group(service))
        if have < warm:
            if not self.restart_backoff.may_start(service):
                return (), ()
            return tuple(
                self._start(service, fence, warm=True).name for _ in range(warm - have)
            ), ()
        excess = trim_order(pool, lambda w: self._pool.node(w.name) is not None, _number)
        stopping = excess[: max(0, have - warm)]
        for worker in stopping:
            self._spawn(self._release, worker, fence, state="releasing")
        return (), tuple(w.name for w in stopping)

    def _spawn(self, target: Callable[[LocalWorker, Fence], None], worker: LocalWorker,
               fence: Fence, state: str = "draining") -> None:  # fmt: skip
        """Run a drain or a replacement of ``worker`` in the background (called under the lock)."""
        worker.state = state
        thread = threading.Thread(
            target=target, args=(worker, fence), name=f"drain-{worker.name}", daemon=True
        )
        self._drains.append(thread)
        thread.start()

    def _heartbeat_file(self, service: str, number: int) -> Path:
        return self.workdir / f"{service}-{number}.heartbeat"

    def _start(self, service: str, fence: Fence = UNFENCED, *, warm: bool = False) -> LocalWorker:
        """Start a worker: serving, or ``warm`` (recorded in the pool first, booting without
        consuming, watched until it answers)."""
        spec = self._specs[service]
        used = {w.number for w in self._workers[service]}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        name = f"{service}-{number}@{self.hostname}"
        pidfile = self.workdir / f"{service}-{number}.pid"
        pidfile.unlink(missing_ok=True)  # a stale one from a killed worker would block the start
        heartbeat = self._heartbeat_file(service, number)
        heartbeat.unlink(missing_ok=True)  # the old worker's: its age is not this one's
        command = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-Q", ",".join(spec.queues), "-n", name,
            "--concurrency", str(self.concurrency), "--loglevel", self.loglevel,
            "--pidfile", str(pidfile),
            # As the stack's workers (start-worker.sh): no 1 s mingle wait at every start, no
            # gossip subscription; heartbeats, events and control commands stay.
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        fence.check(f"start worker {name}")
        env = {**os.environ, **self.env, "WORKER_HEARTBEAT_FILE": str(heartbeat)}
        env.pop(WARM_ENV, None)
        if warm:
            self._pool.enlist(service, name, fence)  # before it runs: never taken for serving
            env[WARM_ENV] = "1"
        log_file = (self.workdir / f"{service}-{number}.log").open("ab")
        try:
            popen = subprocess.Popen(
                command,
                env=env,
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
        if warm:
            self._pool.watch(service, name, lambda: name, spec.queues, fence)
        log.info("started %sworker %s (pid %d)", "warm " if warm else "", name, popen.pid)
        return worker

    def _choose_for_removal(self, running: list[LocalWorker], count: int) -> list[LocalWorker]:
        """Idle workers first (fewest running tasks), then the highest numbers."""
        busy = self._busy_counts([w.name for w in running]) or {}
        return removal_order(running, lambda w: busy.get(w.name, 0), _number)[:count]

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

    def _drain(self, worker: LocalWorker, fence: Fence = UNFENCED) -> None:
        """Cancel consumers, wait until idle, warm shutdown; escalate only past the grace."""
        try:
            kind, detail = self._stop(worker, fence, answers=True)
        except LeadershipLost as exc:
            self._fenced(worker, exc)
            return
        self._forget(worker)
        with self._lock:
            self._events.append(BackendEvent(worker.service, kind, f"{worker.name}: {detail}"))
        log.info("worker %s stopped (%s)", worker.name, detail)

    def _drain_to_pool(self, worker: LocalWorker, fence: Fence = UNFENCED) -> None:
        """Cancel consumers (confirmed), wait until idle, and record the worker as warm instead
        of stopping it; one that stays busy past the grace gets its consumers back and serves."""
        queues = self._specs[worker.service].queues
        try:
            problem = set_consumers(
                self.app, worker.name, queues, add=False, fence=fence,
                timeout_s=self.control_timeout_s,
            )  # fmt: skip
            deadline = self.clock() + self.grace_s
            idle = False
            while problem is None and self.clock() < deadline and worker.alive():
                fence.check(f"drain {worker.name} to the warm pool")
                busy = self._busy_counts([worker.name])
                if busy is not None and busy.get(worker.name) == 0:
                    idle = True
                    break
                time.sleep(POLL_S)
            if idle:
                self._pool.admit(worker.service, worker.name, worker.name, fence)
                kind, detail = "returned-to-pool", "drained: warm, consuming nothing"
            else:
                set_consumers(self.app, worker.name, queues, add=True, fence=fence,
                              timeout_s=self.control_timeout_s)  # fmt: skip
                why = problem or f"still busy after {self.grace_s}s"
                kind, detail = "to-pool-aborted", f"{why}: serving again"
        except LeadershipLost as exc:
            self._fenced(worker, exc)
            return
        except BackendError as exc:  # the pool store: serving again, adoption re-checks it
            kind, detail = "to-pool-aborted", f"{exc}: serving again"
            with self._lock:
                self._adopt_pending = True
        with self._lock:
            if worker.state == "pooling":
                worker.state = "running"
            self._events.append(BackendEvent(worker.service, kind, f"{worker.name}: {detail}"))

    def _release(self, worker: LocalWorker, fence: Fence = UNFENCED) -> None:
        """Stop a warm worker (the pool is trimmed): it is idle, so no drain; then drop it."""
        try:
            kind, detail = self._stop(worker, fence, answers=False)
            self._forget(worker)
            self._pool.leave(worker.service, worker.name)
        except LeadershipLost as exc:
            self._fenced(worker, exc)
            return
        except BackendError as exc:  # the store: the entry is pruned at the next reconcile
            kind, detail = "warm-release-failed", str(exc)
        with self._lock:
            self._events.append(
                BackendEvent(worker.service, "warm-stopped", f"{worker.name}: {kind}, {detail}")
            )

    def _stop(self, worker: LocalWorker, fence: Fence, *, answers: bool) -> tuple[str, str]:
        """Stop ``worker``: drain it first if it ``answers`` the control API; every signal
        fenced. Returns the event kind and detail; messages a cold stop left are restored."""
        spec = self._specs.get(worker.service)
        deadline = self.clock() + self.grace_s
        if answers:
            try:
                for queue in spec.queues if spec else ():
                    fence.check(f"cancel {worker.name}'s consumer of {queue}")
                    self.app.control.cancel_consumer(
                        queue, destination=[worker.name], reply=True, timeout=self.control_timeout_s
                    )
            except LeadershipLost:
                raise
            except Exception as exc:
                log.warning("cancel_consumer for %s failed: %s", worker.name, exc)
            while self.clock() < deadline and worker.alive():
                fence.check(f"drain {worker.name}")  # a drain outlives no leadership
                busy = self._busy_counts([worker.name])
                if busy is not None and busy.get(worker.name) == 0:
                    break
                time.sleep(POLL_S)

        def exited(timeout_s: float, then: str) -> bool:
            """Wait for the exit with the fence checked as we go: a lease lost during the grace
            period ends the wait here (LeadershipLost), and the escalation never comes."""
            end = time.monotonic() + timeout_s
            while worker.alive():
                fence.check(f"{then} {worker.name} (waiting for it to exit)")
                if time.monotonic() >= end:
                    return False
                time.sleep(POLL_S / 2)
            return True

        fence.check(f"SIGTERM {worker.name}")
        worker.signal(signal.SIGTERM)
        kind, detail = "drained", "warm shutdown"
        escalation = "SIGQUIT" if answers else "SIGKILL"
        if not exited(max(self.grace_s, deadline - self.clock()), escalation):
            if answers:
                fence.check(f"SIGQUIT {worker.name}")
                worker.signal(signal.SIGQUIT)
                kind, detail = "drain-timeout", f"still running after {self.grace_s}s: SIGQUIT"
            else:
                kind, detail = "killed", f"no answer, still running {self.grace_s}s after SIGTERM"
            if not answers or not exited(5.0, "SIGKILL"):
                fence.check(f"SIGKILL {worker.name}")
                worker.kill_tree()
                worker.wait(5.0)
                detail += ", then SIGKILL" if answers else ": SIGKILL"
            with self._lock:
                self._restore_dead(worker)  # a cold or killed shutdown may leave messages
        return kind, detail

    def _fenced(self, worker: LocalWorker, exc: LeadershipLost) -> None:
        """A drain or replacement stopped by its fence: the worker is running again for whoever
        leads next (its adoption re-adds consumers a cancel took away)."""
        with self._lock:
            if worker.state in ("draining", "pooling", "releasing"):
                worker.state = "running"
            self._adopt_pending = True
            self._events.append(BackendEvent(worker.service, "fenced", f"{worker.name}: {exc}"))

    def _replace_unresponsive(self, worker: LocalWorker, fence: Fence = UNFENCED) -> None:
        """A worker whose heartbeat went stale: drain it if it answers a ping, else stop or
        kill it; restore what it held; start its replacement."""
        try:
            replies = self.app.control.ping(
                destination=[worker.name], timeout=self.control_timeout_s
            )
        except Exception as exc:  # the broker: maybe why the heartbeat stopped; not its fault
            with self._lock:
                worker.state = "running"
                self._events.append(
                    BackendEvent(worker.service, "unresponsive-check-failed",
                                 f"{worker.name}: ping: {type(exc).__name__}: {exc}")
                )  # fmt: skip
            return
        answers = any(worker.name in reply for reply in replies or [])
        try:
            kind, detail = self._stop(worker, fence, answers=answers)
            with self._lock:
                self._restore_dead(worker)  # before its replacement takes its name
                self._forget(worker)
                self._restored.discard(worker.pid)
                note = f"{worker.name}: {detail}"
                if self.restart_backoff.may_start(worker.service):
                    note += f"; started {self._start(worker.service, fence).name}"
                self._events.append(BackendEvent(worker.service, "replaced-unresponsive", note))
        except LeadershipLost as exc:
            self._fenced(worker, exc)
            return
        log.warning("unresponsive worker %s replaced (%s)", worker.name, kind)

    def _forget(self, worker: LocalWorker) -> None:
        with self._lock:
            group = self._workers.get(worker.service, [])
            if worker in group:
                group.remove(worker)
        if worker.log_file is not None:
            worker.log_file.close()
        worker.pidfile.unlink(missing_ok=True)

    def reconcile(self, fence: Fence = UNFENCED) -> list[BackendEvent]:
        """Replace running workers that died (a crash loop waits out its backoff: the dead
        worker stays listed as dead until then) and those whose heartbeat went stale; return
        what happened since the last call."""
        pool_events = self._reconcile_pool(fence)  # broker round trips: unlocked
        with self._lock:
            now = self.clock()
            members = self._members_known
            for service in self._specs:
                for worker in self._unresponsive(service):
                    if worker.name not in members.get(service, set()):
                        self._spawn(self._replace_unresponsive, worker, fence)
                dead = [w for w in self._workers[service] if w.state == "running" and not w.alive()]
                for worker in [w for w in dead if w.name in members.get(service, set())]:
                    dead.remove(worker)  # a warm one: dropped, the next decision refills the pool
                    self._forget(worker)
                    self._events.append(
                        BackendEvent(service, "warm-died", f"{worker.name}: dropped from the pool")
                    )
                for worker in dead:
                    lifetime = None if worker.started_at is None else now - worker.started_at
                    self.restart_backoff.exited(service, str(worker.pid), lifetime)
                    if worker.pid not in self._restored:  # before its replacement (same name)
                        self._restore_dead(worker)
                if not dead or not self.restart_backoff.may_start(service):
                    continue
                for worker in dead:
                    try:
                        fence.check(f"replace dead worker {worker.name}")
                    except LeadershipLost as exc:
                        self._events.append(BackendEvent(service, "fenced", str(exc)))
                        break
                    self._forget(worker)
                    self._restored.discard(worker.pid)
                    self.restart_backoff.forget(service, str(worker.pid))
                    code = worker.popen.returncode if worker.popen else None
                    replacement = self._start(service, fence)
                    self._events.append(
                        BackendEvent(
                            service,
                            "replaced",
                            f"{worker.name} died (exit {code}); started {replacement.name}",
                        )
                    )
            self._events.extend(self.restart_backoff.events())
        restored = self._restore_stranded(fence)  # broker round trip: unlocked
        with self._lock:
            events, self._events = [*self._events, *pool_events, *restored], []
        return [*events, *self._pool.events()]

    def _reconcile_pool(self, fence: Fence) -> list[BackendEvent]:
        """Drop members whose worker is gone, watch the booting (or adopted) ones until they
        answer, and correct ready ones whose consumer came back (scaler.backends.warm_pool)."""
        events: list[BackendEvent] = []
        known: dict[str, set[str]] = {}
        for service, spec in self._specs.items():
            try:
                with self._lock:
                    alive = {w.name for w in self._group(service) if w.alive()}
                gone = self._pool.prune(service, alive, fence)
                if gone:
                    events.append(BackendEvent(service, "warm-gone", f"dropped {gone}"))
                members = known[service] = self._pool.members(service)
                for name in members:
                    self._pool.watch(service, name, partial(str, name), spec.queues, fence)
                self._pool.check(service, spec.queues, fence)
            except LeadershipLost as exc:
                events.append(BackendEvent(service, "fenced", f"warm pool: {exc}"))
            except Exception as exc:  # the store or the broker: checked again next time
                detail = f"{type(exc).__name__}: {exc}; checked again at the next reconcile"
                events.append(BackendEvent(service, "warm-check-failed", detail))
        with self._lock:
            self._members_known = {**self._members_known, **known}
        return events

    def _unresponsive(self, service: str) -> list[LocalWorker]:
        """Running workers whose heartbeat file is older than the service's bound (called
        under the lock). A worker that never wrote one is not judged."""
        bound = self._specs[service].unresponsive_after_s
        if bound is None:
            return []
        stale = []
        for worker in self._running(service):
            try:
                age = time.time() - self._heartbeat_file(service, worker.number).stat().st_mtime
            except OSError:
                continue
            if age > bound:
                log.warning("worker %s: heartbeat %.0f s old (bound %g s)", worker.name, age, bound)
                stale.append(worker)
        return stale

    def _restore_dead(self, worker: LocalWorker) -> None:
        """Give back what a dead worker held, once per process (called under the lock)."""
        code = worker.popen.returncode if worker.popen else None
        why = f"pid {worker.pid} exited {code}" if code is not None else f"pid {worker.pid} gone"
        event = restore_dead_workers(self.restorer, worker.service, [worker.name], why)
        if event is None or event.kind != "restore-failed":
            self._restored.add(worker.pid)
        if event is not None:
            self._events.append(event)

    def _restore_stranded(self, fence: Fence = UNFENCED) -> list[BackendEvent]:
        """The standing consumer check (scaler.backends.stranded): serving workers consuming
        none of their queues get them back; one a heal did not cure is replaced like an
        unresponsive one (drained if it answers, stopped, another started)."""
        try:
            members = {s: self._pool.members(s) for s in self._specs}  # warm on purpose: skipped
        except BackendError as exc:
            detail = f"warm pool unreadable ({exc}); tried again at the next reconcile"
            return [BackendEvent(",".join(self._specs), CHECK_FAILED, detail)]
        committed = self._pool.committed()  # their watch gives them their queues
        with self._lock:
            self._adopt_pending = False
            serving = {
                w.name: w
                for s in self._specs
                for w in self._running(s)
                if w.name not in members[s] and w.name not in committed
            }

        def still_serving(name: str) -> bool:  # under the lock: a drain marks its worker first
            worker = serving[name]
            group = self._workers.get(worker.service, [])
            return worker.state == "running" and worker.alive() and worker in group

        def replace(name: str) -> str:
            self._spawn(self._replace_unresponsive, serving[name], fence)
            return "replacing it (drained, stopped, another started: replaced-unresponsive)"

        wanted = {n: (w.service, self._specs[w.service].queues) for n, w in serving.items()}
        return self._consumers.run(wanted, lock=self._lock, still_serving=still_serving,
                                   replace=replace, fence=fence)  # fmt: skip

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

    def wait_for_warm(self, timeout_s: float) -> bool:
        """Wait until every booting warm worker answered (for tests and benchmarks)."""
        return self._pool.wait_ready(timeout_s)

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
