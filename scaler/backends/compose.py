"""The Docker Compose backend: scales a Compose service by adding and removing its containers.

Compose has no "scale to N" API of its own that a sidecar could call, so this backend does what
`docker compose up --scale` does, through the Docker engine API:

- A service is managed only if its containers carry the project's Compose labels and the opt-in
  label ``autoscale.managed=true``, and the policy names it. Nothing else is ever touched.
- Scale up clones the inspected configuration of the service's lowest-numbered running replica
  (image, command, environment, mounts, networks, labels), changing only the name
  ``{project}-{service}-{N}``, the container-number label and the network aliases: the engine
  gate composes and creates it (``POST /gate/v1/replicas``, scaler/gate/clone.py; the backend
  reaches the engine only through the gate, docs/gate.md), the backend starts it. The
  config-hash label stays equal, so `docker compose ps` lists the clone, `docker compose down`
  removes it and a later `docker compose up` does not recreate it (it does reset the count to the
  file's: the loop just converges again).
- Scale down picks only workers that Celery reports idle (nothing active, nothing reserved),
  highest container numbers first, and drains each in a background thread: cancel its consumers,
  wait until it runs and holds nothing, stop it with the service's grace period (SIGTERM, a warm
  shutdown), remove it. Scaling to zero keeps the last container stopped as the template to wake.
- A container that died (exited non-zero, or "dead") is reported, removed and recreated; one
  that died within ``crash_window_s`` of its start crashed, and consecutive crashes delay the
  service's next start exponentially (``scaler.backends.restart_backoff``, shared with the local
  backend): the dead container stays until then, and no scale-up starts one either.
- A template that reaches the host (privileged, added capabilities, devices, host namespaces,
  an unconfined SecurityOpt, VolumesFrom, bind mounts outside the policy's
  ``clone.allowed_bind_mounts``, and ``SCALER_CLONE_ALLOWED_BIND_MOUNTS``: the stack's secret
  files) is never cloned nor woken (``scaler.backends.template_safety``): the error names the
  container and each setting, and the service holds.
- Container CPU is read in percent of the container's CPU limit (``cpus``), inspected once per
  container when its stats reader starts.
- Engine and broker errors are retried with a short backoff, then raised as BackendError and shown
  in health(): the loop holds, and nothing is ever stopped on data that could not be read.
- One container listing per loop cycle: after ``begin_cycle()`` the first listing (reconcile's, or
  the first read's) is shared by the cycle's reads (``replicas``, ``workers``), a failed one too
  (the cycle holds without asking again). ``scale`` and ``reconcile`` always list afresh, and
  every action (scale, replacement, a drain ending, ``manage``) drops the shared listing. Without
  ``begin_cycle()`` (tests, one-off callers) every read lists. A listing is read from the engine
  gate's snapshot (``GET /gate/v1/snapshot``, ``scaler.backends.gate_snapshot``: the managed
  containers as the gate keeps them from the engine's events), whose entries also answer the
  inspections of lifetimes, CPU limits and hostnames; when the gate has none (an older gate, or
  not ready) the backend lists and inspects as before.
- Consumers: every reconcile asks the live workers neither warm nor draining which queues they
  consume (one request, returning once all answered) and gives the ones consuming none back
  their queues; one still consuming none at the next check is replaced like an unresponsive one
  (``scaler.backends.stranded``). So a worker whose drain was cut short by a scaler's death, or
  whose consumer a broker reconnect lost, takes work again.
- Unresponsive workers: a live container whose healthcheck says unhealthy (the listing's status,
  no extra call) is inspected once; when its heartbeat (the age ``healthcheck-file.sh`` prints,
  else how long its probes have failed) is older than the service's ``unresponsive_after_s``, a
  background thread drains it if it answers a ping (else stops it: SIGTERM, SIGKILL past the
  grace period), restores what it held and starts a clone in its place under the same number.
  A failing ping (the broker down, which also stops every heartbeat) holds the replacement.
- Fencing (``scaler.fencing``): every engine call that changes something (create, connect,
  start, stop, remove) and every drain step (cancel consumer, stop, remove, re-add consumers)
  checks the fence of the action it belongs to first, in drain and replacement threads too: a
  thread that outlives its leadership, or its lease generation, stops before its next call and
  the container is left to the next leader's adoption check.
- The warm pool (``scaler.backends.warm_pool``; docs/scaler-compose-backend.md): members are
  container ids in the pool store. A clone for the pool gets ``WORKER_WARM_START=1`` (cold clones
  never carry it), is recorded between create and start, and is watched until its worker
  answers. ``replicas()`` leaves members out; ``scale`` promotes ready members before cloning,
  returns drained replicas to the pool while it is short, then refills or trims it (stopping
  and removing idle members, booting ones first). A member that died or stopped is removed, not
  replaced; a parked container born warm is re-created cold rather than woken (it would boot
  consuming nothing); members are never judged by their heartbeat nor given queues back.
"""

from __future__ import annotations

import logging
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any, NoReturn, TypeVar

import docker
import docker.errors
from celery import Celery

from scaler.backends.base import (
    BackendError,
    BackendEvent,
    BackendHealth,
    ScaleResult,
    WorkerInfo,
)
from scaler.backends.engine import (
    ClientFactory,
    Engine,
    default_client_factory,
    gate_call,
    gate_scope,
)
from scaler.backends.gate_snapshot import SnapshotReader
from scaler.backends.listing import CycleListing
from scaler.backends.removal import removal_order
from scaler.backends.restart_backoff import RestartBackoff
from scaler.backends.stranded import CHECK_FAILED, ConsumerCheck
from scaler.backends.template_safety import extra_bind_mounts, unsafe_settings
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
from scaler.backends.worker_queries import ask_busy, names_by_host
from scaler.fencing import UNFENCED, Fence, LeadershipLost
from scaler.observations import Resources
from scaler.restore import UnackedRestorer, restore_dead_workers
from scaler.signals.containers import ContainerStats

log = logging.getLogger(__name__)

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
MANAGED_LABEL = "autoscale.managed"

# Container states that count as a live replica: Docker brings "restarting" back by itself.
LIVE_STATES = frozenset({"running", "restarting", "paused"})
DEFAULT_STOP_TIMEOUT_S = 10  # Docker's own default when a service sets no stop_grace_period

T = TypeVar("T")


@dataclass(frozen=True)
class ComposeContainer:
    """One container of a managed service, as the engine's container list shows it."""

    id: str
    name: str
    service: str
    number: int
    state: str  # Docker's: running, exited, created, restarting, paused, dead, removing
    exit_code: int | None  # for exited containers, parsed from the list's status text
    unhealthy: bool = False  # its healthcheck fails ("(unhealthy)" in the list's status text)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def died(self) -> bool:
        """Exited on its own: non-zero exit (killed, crashed, OOM) or the engine marks it dead.

        A zero exit is a warm shutdown somebody asked for (this backend parking the last
        replica, or an operator's `docker compose stop`): left alone, and used to wake from zero.
        """
        return self.state == "dead" or (self.state == "exited" and self.exit_code != 0)


_EXITED = re.compile(r"Exited \((-?\d+)\)")
_DOCKER_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def docker_time(text: object) -> float | None:
    """An engine time stamp (RFC 3339 with nanoseconds) as Unix seconds; None for Docker's
    zero time ("0001-01-01T00:00:00Z": never) or anything unreadable."""
    match = _DOCKER_TIME.match(str(text or ""))
    if match is None or match.group(1).startswith("0001-"):
        return None
    whole, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp()
    return stamp + (float(f"0.{fraction}") if fraction else 0.0)


_HEARTBEAT_AGE = re.compile(r" is (\d+)s old")


def heartbeat_age_s(inspected: dict[str, Any], now: float) -> float | None:
    """How old an unhealthy container's heartbeat is at ``now`` (Unix seconds); None when the
    container is not unhealthy or has no probe results.

    ``healthcheck-file.sh`` prints the file's age when it fails: the age the last probe saw (not
    extrapolated: a worker that came back since would be judged on a guess). Any other failing
    check (or "no heartbeat file yet") counts from the start of the oldest failing probe Docker
    still keeps. Both are lower bounds: the scaler acts late, never early.
    """
    health = (inspected.get("State") or {}).get("Health") or {}
    probes = health.get("Log") or []
    if health.get("Status") != "unhealthy" or not probes:
        return None
    last = probes[-1]
    match = _HEARTBEAT_AGE.search(str(last.get("Output") or ""))
    if match:
        return float(match.group(1))
    failing = []
    for probe in reversed(probes):
        if probe.get("ExitCode") == 0:
            break
        failing.append(probe)
    started = docker_time(failing[-1].get("Start")) if failing else None
    return None if started is None else max(0.0, now - started)


def lifetime_s(inspected: dict[str, Any]) -> float | None:
    """How long an exited container ran (State.StartedAt to State.FinishedAt); None if unknown.

    A process that exits at once can be recorded as finished a hair before the engine stamps its
    start: that reads as 0, not as unknown.
    """
    state = inspected.get("State") or {}
    started, finished = docker_time(state.get("StartedAt")), docker_time(state.get("FinishedAt"))
    if started is None or finished is None:
        return None
    return max(0.0, finished - started)


def worker_node_name(inspected: dict[str, Any]) -> str:
    """The Celery node name a container's command line suggests (the workers confirm it).

    Celery names a worker ``celery@<hostname>`` unless the command passes ``-n``/``--hostname``
    (where ``%h``, ``%n``, ``%d`` and ``$HOSTNAME`` expand as in the worker). The container's
    hostname is Docker's short id unless the service sets one.
    """
    config = inspected.get("Config") or {}
    host = str(config.get("Hostname") or inspected.get("Id", "")[:12])
    domain = str(config.get("Domainname") or "")
    fqdn = f"{host}.{domain}" if domain else host
    words: list[str] = []
    for part in [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]:
        words.extend(shlex.split(part) if " " in part else [part])
    name: str | None = None
    for i, word in enumerate(words):
        if word in ("-n", "--hostname") and i + 1 < len(words):
            name = words[i + 1]
        elif word.startswith("--hostname="):
            name = word.split("=", 1)[1]
    if name is None:
        return f"celery@{host}"
    for token, value in (
        ("${HOSTNAME}", host),
        ("$HOSTNAME", host),
        ("%h", fqdn),
        ("%n", host),
        ("%d", domain),
    ):
        name = name.replace(token, value)
    return name if "@" in name else f"celery@{name}"


def cpu_limit(inspected: dict[str, Any]) -> float | None:
    """A container's CPU limit in CPUs from its inspected HostConfig; None when unlimited.

    Compose's ``cpus`` (``deploy.resources.limits.cpus``) and ``docker run --cpus`` set
    ``NanoCpus``; ``--cpu-quota``/``--cpu-period`` set ``CpuQuota``/``CpuPeriod`` (the period
    defaults to 100 ms).
    """
    host = inspected.get("HostConfig") or {}
    nano = host.get("NanoCpus") or 0
    if nano > 0:
        return float(nano) / 1e9
    quota = host.get("CpuQuota") or 0
    if quota > 0:
        return float(quota) / float(host.get("CpuPeriod") or 100_000)
    return None


def gate_project(client_factory: ClientFactory | None = None) -> str:
    """The Compose project the engine gate serves (GATE_PROJECT): the stack's scaler follows
    whatever name Compose was given (``-p``, COMPOSE_PROJECT_NAME, the file's ``name:``)."""
    return gate_scope(PROJECT_LABEL, "Compose project", client_factory)


def _from_row(row: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """A container listing's row: its labels, and the fields of its ComposeContainer."""
    status = str(row.get("Status") or "")
    match = _EXITED.search(status)
    return row.get("Labels") or {}, {
        "id": row["Id"],
        "name": (row.get("Names") or ["/?"])[0].lstrip("/"),
        "state": str(row.get("State", "")),
        "exit_code": int(match.group(1)) if match else None,
        "unhealthy": "(unhealthy)" in status,
    }


def _from_entry(entry: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """An entry of the gate's snapshot (an inspected container's shape), read as ``_from_row``
    reads a listing's row: the exit code of an exited container only, unhealthy only running."""
    state = entry.get("State") or {}
    status = str(state.get("Status") or "")
    health = (state.get("Health") or {}).get("Status")
    return (entry.get("Config") or {}).get("Labels") or {}, {
        "id": entry["Id"],
        "name": str(entry.get("Name") or "/?").lstrip("/"),
        "state": status,
        "exit_code": int(state.get("ExitCode") or 0) if status == "exited" else None,
        "unhealthy": status == "running" and health == "unhealthy",
    }


def _start(container_id: str, client: docker.DockerClient) -> None:
    client.api.start(container_id)


def _remove(container_id: str, client: docker.DockerClient) -> None:
    client.api.remove_container(container_id, force=True)


class GateRefused(Exception):
    """The gate refused a clone (403): its message names the template and each setting."""


def _create_replica(wanted: dict[str, Any], client: docker.DockerClient) -> dict[str, Any]:
    """``POST /gate/v1/replicas``: the clone created, not started; {"Id", "Name"}."""
    try:
        return dict(gate_call(client, "POST", "/gate/v1/replicas", wanted))
    except docker.errors.APIError as exc:
        message = str(exc.explanation or "")
        if exc.status_code == 403 and message.startswith("gate: refusing to clone"):
            raise GateRefused(message.removeprefix("gate: ")) from None
        if exc.status_code in (403, 404) and not message.startswith("gate:"):
            raise BackendError(
                f"{client.api.base_url} does not serve POST /gate/v1/replicas: the Compose "
                "backend creates replicas through the engine gate (python -m scaler.gate, "
                "docs/gate.md), not the engine's general API"
            ) from None
        raise


def stop_fenced(
    client: docker.DockerClient,
    container_id: str,
    info: dict[str, Any],
    fence: Fence,
    what: str,
    poll_s: float = 0.25,
) -> None:
    """``docker stop`` with its irreversible step fenced. The engine's own stop would SIGKILL
    the container at the end of its grace period whoever leads by then; here the container's
    stop signal is sent, its exit awaited for the grace period (StopTimeout) with the fence
    checked at every poll, and only after a fresh check is it killed (a zero-timeout stop: the
    engine's SIGKILL, and its wait for the exit). A lease lost meanwhile raises LeadershipLost
    and leaves the container, shutting down or not, to whoever leads."""
    config = info.get("Config") or {}
    grace = int(config.get("StopTimeout") or DEFAULT_STOP_TIMEOUT_S)
    fence.check(f"stop {what}")
    if not (info.get("State") or {}).get("Running"):
        return
    try:  # the stop signal as `docker stop` sends it: the restart policy does not bring it back
        client.api.kill(container_id, signal=config.get("StopSignal") or "SIGTERM")
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: not running any more
            raise
        return
    deadline = time.monotonic() + grace
    while (client.api.inspect_container(container_id).get("State") or {}).get("Running"):
        fence.check(f"kill {what} past its grace period (waiting for it to exit)")
        if time.monotonic() >= deadline:
            client.api.stop(container_id, timeout=0)
            return
        time.sleep(poll_s)


class ComposeBackend(CycleListing[dict[str, list[ComposeContainer]]]):
    """Scales the managed services of one Compose project (see the module docstring)."""

    name = "compose"

    def __init__(
        self,
        project: str,
        app: Celery,
        *,
        client_factory: ClientFactory | None = None,
        drain_timeout_s: float = 3600.0,
        inspect_timeout_s: float = 1.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        stats_stale_after_s: float = 5.0,
        restart_backoff: RestartBackoff | None = None,
        restorer: UnackedRestorer | None = None,
        pool_store: PoolStore | None = None,
        allowed_bind_mounts: tuple[str, ...] | None = None,
        use_snapshot: bool = True,
    ) -> None:
        if not project or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project):
            raise ValueError(
                f"project={project!r}: expected a Compose project name "
                "(lowercase letters, digits, '-' and '_', starting with a letter or digit)"
            )
        for field, value in (
            ("drain_timeout_s", drain_timeout_s),
            ("inspect_timeout_s", inspect_timeout_s),
            ("backoff_s", backoff_s),
        ):
            if value <= 0:
                raise ValueError(f"{field}={value!r}: expected a positive number of seconds")
        if attempts < 1:
            raise ValueError(f"attempts={attempts!r}: expected at least 1")
        super().__init__()
        self.project = project
        self.app = app
        self._factory = client_factory or default_client_factory()
        self._drain_timeout_s = drain_timeout_s
        self._inspect_timeout_s = inspect_timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._engine = Engine(self._factory, attempts=attempts, backoff_s=backoff_s)
        # The gate's snapshot, read instead of listing and inspecting (None: always list).
        self.snapshots = SnapshotReader(project) if use_snapshot else None
        self._seen: dict[str, dict[str, Any]] = {}  # container id -> its entry in the snapshot
        self._draining: dict[str, threading.Thread] = {}  # container id -> drain thread
        self._events: list[BackendEvent] = []
        self._nodes: dict[str, str] = {}  # container id -> Celery node name, confirmed
        self._guesses: dict[str, tuple[str, str]] = {}  # container id -> (hostname, parsed name)
        self._parked: set[str] = set()  # stopped by us to wake from zero, whatever its exit code
        self._templates: dict[str, dict[str, Any]] = {}  # service -> last inspected replica
        self._last: dict[str, list[ComposeContainer]] = {}  # last listing, for resources()
        self._suspects: set[str] = set()  # container ids whose drain stopped after the cancel
        self._stats = ContainerStats(lambda: self._factory().api, stale_after_s=stats_stale_after_s)
        self._limits: dict[str, float | None] = {}  # container id -> CPU limit in CPUs, or None
        self._backoff = restart_backoff or RestartBackoff()
        # Gives a dead worker's unacked messages back at once (scaler.restore); None: not Redis.
        self.restorer = restorer
        self._restored: set[str] = set()  # dead container ids whose messages were given back
        self._refused: dict[str, str] = {}  # service -> the last clone refusal, reported once
        self._pool = WarmPool(app, timeout_s=inspect_timeout_s)
        if pool_store is not None:
            self._pool.store = pool_store
        self._to_pool: dict[str, str] = {}  # container id -> service: drains into the pool
        self._consumers = ConsumerCheck(app, inspect_timeout_s)  # the standing consumer check
        # Host paths allowed for every service beside its policy's list (None: from
        # SCALER_CLONE_ALLOWED_BIND_MOUNTS, the stack's secret files).
        self._extra_binds = (
            extra_bind_mounts() if allowed_bind_mounts is None else allowed_bind_mounts
        )

    def use_pool_store(self, store: PoolStore) -> None:
        """Keep warm-pool membership in ``store`` (Redis: survives restarts and leader changes)."""
        self._pool.store = store

    # -- the Backend interface ---------------------------------------------------------------

    def workers(self, service: str) -> list[WorkerInfo]:
        draining, containers = self._view(service)
        out = []
        for c in containers:
            if c.id in draining:
                state = "draining"
            elif c.live:
                state = "running"
            elif c.died and c.id not in self._parked:
                state = "dead"
            else:
                state = "stopped"
            node = self._nodes.get(c.id) or (self._guess(c.id)[1] if c.live else c.name)
            out.append(WorkerInfo(service, node, c.id, state, host=self._hostname(c)))
        return out

    def _hostname(self, container: ComposeContainer) -> str:
        """The container's hostname (cached; "" for an ended container no longer inspectable:
        gone, and a live one that cannot be inspected raises)."""
        try:
            return self._guess(container.id)[0]
        except BackendError:
            if container.live:
                raise
            return ""

    def replicas(self, service: str) -> int:
        """Live containers neither draining nor warm; BackendError when the engine (or the
        pool store) cannot be read."""
        draining, containers = self._view(service)
        members = self._pool.members(service)
        return sum(1 for c in containers if c.live and c.id not in draining | members)

    def warm(self, service: str) -> int:
        """Live warm-pool members (booting or booted) plus drains returning to the pool."""
        draining, containers = self._view(service)
        members = self._pool.members(service)
        with self._lock:
            pooling = sum(1 for svc in self._to_pool.values() if svc == service)
        return pooling + sum(1 for c in containers if c.live and c.id in members - draining)

    def scale(
        self, service: str, replicas: int, fence: Fence = UNFENCED, warm: int | None = None
    ) -> ScaleResult:
        if replicas < 0:
            raise ValueError(f"replicas={replicas!r} for service {service!r}: expected >= 0")
        if warm is not None and warm < 0:
            raise ValueError(f"warm={warm!r} for service {service!r}: expected >= 0 or None")
        self._check_managed(service)
        members = self._pool.members(service)
        draining = self._draining_ids()
        containers = self._list()[service]  # never act on the cycle's shared listing
        live = [c for c in containers if c.live and c.id not in draining]
        serving = [c for c in live if c.id not in members]
        pool = [c for c in live if c.id in members]
        before = len(serving)
        try:
            result = ScaleResult(service, before, before)
            if replicas > before:
                promoted = self._promote(service, pool, replicas - before, fence)
                pool = [c for c in pool if c.name not in promoted]
                need = replicas - before - len(promoted)
                committed = self._commit(service, pool, need, warm, fence) if need else ()
                pool = [c for c in pool if c.name not in committed]
                need -= len(committed)
                taken = (*promoted, *committed)
                try:
                    started = self._scale_up(service, containers, need, fence) if need else ()
                except BackendError:
                    if not taken:
                        raise
                    started = ()
                after = before + len(taken) + len(started)
                result = ScaleResult(service, before, after, started=(*taken, *started),
                                     promoted=promoted, committed=committed)  # fmt: skip
            elif replicas < before:
                with self._lock:
                    pooling = sum(1 for svc in self._to_pool.values() if svc == service)
                room = pool_room(warm, len(pool) + pooling) if warm is not None else 0
                chosen, to_pool = self._scale_down(
                    service, serving, before - replicas, park=replicas == 0, fence=fence,
                    to_pool=room,
                )  # fmt: skip
                after = before - len(chosen) - len(to_pool)
                result = ScaleResult(service, before, after, draining=chosen, to_pool=to_pool)
            if warm is None:
                return result
            if result.started or result.draining or result.to_pool:
                # Afresh: a refill clone's number must not collide with a cold clone this call
                # has just created (a 409 from the engine, then a failed scale and a retry).
                containers = self._list()[service]
            # Busy replicas a scale-down could not remove take the pool's room: serving + warm
            # stays within what the decision asked (replicas + warm, within max_replicas).
            warm = pool_target(warm, result.after, replicas)
            started_warm, stopped_warm = self._size_pool(service, containers, pool, warm, fence)
            return replace(result, warm_started=started_warm, warm_stopped=stopped_warm)
        finally:
            self._invalidate()

    def reconcile(self, fence: Fence = UNFENCED) -> list[BackendEvent]:
        """Replace dead and unresponsive containers, keep one stats reader per live container,
        report drains, and give stranded workers their queues back (on adoption, and after a
        failed drain)."""
        draining = self._draining_ids()
        listing = self._list()  # afresh; it becomes the cycle's shared listing
        events, members = self._reconcile_pool(listing, draining, fence)
        pooled = set().union(*members.values()) if members else set()
        if events:
            listing = self._list()  # dead members were removed
        unread = [s for s in self._specs if s not in members]
        for service in self._specs:
            skip = draining | self._parked | pooled
            dead = [c for c in listing.get(service, []) if c.died and c.id not in skip]
            for c in dead:
                if not self._backoff.knows(service, c.id):
                    self._backoff.exited(service, c.id, self._lifetime(c))
                if c.id not in self._restored:  # before any replacement starts
                    events += self._restore_dead(service, c)
            if not self._backoff.may_start(service):
                continue  # a crash loop: the dead stay until the backoff runs out
            for c in dead:
                events.append(self._replace(service, c, listing.get(service, []), fence))
        if events:
            self._invalidate()  # the listing still shows the dead, not their replacements
        events = self._backoff.events() + events
        # Members are warm on purpose: never judged by their heartbeat nor given queues back;
        # while a service's pool is unreadable none of its workers is.
        others = {s: [c for c in cs if c.id not in pooled] for s, cs in listing.items()}
        events += self._replace_unresponsive(others, draining, fence)
        events += self._restore_stranded(
            {s: cs for s, cs in others.items() if s not in unread}, draining, fence
        )
        live = [c.id for cs in listing.values() for c in cs if c.live]
        limits = self._cpu_limits(live)
        self._stats.track((cid for cid in live if cid in limits), limits)
        with self._lock:
            events, self._events = [*self._events, *events], []
        return [*events, *self._pool.events()]

    def resources(self, service: str) -> Resources:
        """Mean of the latest streamed samples of the service's live containers (no API call)."""
        return self._stats.mean(c.id for c in self._last.get(service, []) if c.live)

    def health(self) -> BackendHealth:
        extra: dict[str, object] = {
            "project": self.project,
            "draining": len(self._draining_ids()),
            "stats_readers": len(self._stats.tracked()),
            "stats_errors": len(self._stats.errors()),
        }
        crash_loops = self._backoff.state()
        if crash_loops:
            extra["crash_loop"] = crash_loops
        try:
            self._call("ping the Docker engine", lambda client: client.ping())
        except BackendError as exc:
            return BackendHealth(False, str(exc), extra)
        if self._engine.last_error:
            extra["last_error"] = self._engine.last_error
        return BackendHealth(True, "", extra)

    def wait_for_warm(self, timeout_s: float) -> bool:
        """Wait until every booting warm replica answered (for tests and benchmarks)."""
        return self._pool.wait_ready(timeout_s)

    def close(self) -> None:
        """Stop the stats readers and drop the client; containers and drains are left running."""
        self._stats.close()
        self._engine.close()

    # -- reading the engine --------------------------------------------------------------------

    def _call(
        self, what: str, fn: Callable[[docker.DockerClient], T], fence: Fence | None = None
    ) -> T:
        """Run one engine call, retrying transient errors with backoff; BackendError at the end.

        Client errors (4xx: not found, conflict) are not transient and are raised at once. A
        call that changes something passes its action's ``fence``, checked before each attempt
        (LeadershipLost is not retried).
        """
        return self._engine.call(what, fn, fence)

    def _view(self, service: str) -> tuple[set[str], list[ComposeContainer]]:
        """Draining ids and the service's containers, for reads: the cycle's shared listing if
        there is one (read together with the draining set, which a drain's end changes only
        together with dropping the listing), else a fresh one."""
        self._check_managed(service)
        with self._lock:  # one read of both: a drain's end changes them together
            draining, shared = set(self._draining), self._snapshot
        if isinstance(shared, BackendError):
            raise BackendError(f"{shared} (this cycle's listing; not asked again)")
        listing = shared if shared is not None else self._list()
        return draining, listing[service]

    def _list(self) -> dict[str, list[ComposeContainer]]:
        """Every opted-in container of the managed services, grouped by service, by number.

        Within a cycle the result (or the error) becomes the shared listing, unless something
        dropped the shared listing while this one was being taken.
        """
        filters = {
            "label": [f"{PROJECT_LABEL}={self.project}", f"{MANAGED_LABEL}=true"],
        }
        with self._lock:
            generation = self._generation
        try:
            listed = self._snapshot_rows()
            if listed is None:
                rows = self._call(
                    "list containers",
                    lambda client: client.api.containers(all=True, filters=filters),
                )
                listed = [_from_row(row) for row in rows]
        except BackendError as exc:
            self._share(generation, exc)
            raise
        grouped: dict[str, list[ComposeContainer]] = {name: [] for name in self._specs}
        for labels, fields in listed:
            service = labels.get(SERVICE_LABEL, "")
            if service not in grouped or labels.get(ONEOFF_LABEL, "False") != "False":
                continue  # not named by the policy, or a `docker compose run` one-off
            number = int(labels.get(NUMBER_LABEL, "0") or 0)
            grouped[service].append(ComposeContainer(service=service, number=number, **fields))
        for cs in grouped.values():
            cs.sort(key=lambda c: c.number)
        self._last = grouped
        self._share(generation, grouped)
        return grouped

    def _snapshot_rows(self) -> list[tuple[dict[str, str], dict[str, Any]]] | None:
        """The gate's snapshot as listed containers (its entries kept for ``_inspected``);
        None when there is none to read: list instead."""
        reader = self.snapshots
        entries = None if reader is None else self._call("read the gate's snapshot", reader.read)
        self._seen = {str(e["Id"]): e for e in entries or []}
        return None if entries is None else [_from_entry(e) for e in entries]

    def _draining_ids(self) -> set[str]:
        with self._lock:
            return set(self._draining)

    def _inspect(self, container_id: str) -> dict[str, Any]:
        return self._call(
            f"inspect container {container_id[:12]}",
            lambda client: client.api.inspect_container(container_id),
        )

    def _inspected(self, container_id: str) -> dict[str, Any]:
        """The container's entry in the last snapshot read (its labels, command line, state,
        times and CPU limit), else the engine's inspection."""
        return self._seen.get(container_id) or self._inspect(container_id)

    def _lifetime(self, container: ComposeContainer) -> float | None:
        """How long a dead container ran, from the engine; None when it cannot be read."""
        try:
            return lifetime_s(self._inspected(container.id))
        except BackendError as exc:
            log.warning("no lifetime for %s: %s", container.name, exc)
            return None

    def _cpu_limits(self, container_ids: list[str]) -> dict[str, float | None]:
        """Each container's CPU limit in CPUs (None: unlimited), inspected once per container.

        Only containers new to tracking are inspected (the limit cannot change without a new
        container). One whose inspect fails is left out: it is not tracked this cycle and is
        tried again at the next reconcile, so its CPU is never read on the wrong scale.
        """
        tracked = self._stats.tracked()
        for cid in container_ids:
            if cid in self._limits or cid in tracked:
                continue
            try:
                self._limits[cid] = cpu_limit(self._inspected(cid))
            except BackendError as exc:
                log.warning("no CPU limit for %s yet: %s", cid[:12], exc)
        for gone in set(self._limits) - set(container_ids):
            del self._limits[gone]
        return {cid: self._limits[cid] for cid in container_ids if cid in self._limits}

    def _guess(self, container_id: str) -> tuple[str, str]:
        """The container's hostname and the node name its command line suggests."""
        guess = self._guesses.get(container_id)
        if guess is None:
            inspected = self._inspected(container_id)
            host = str((inspected.get("Config") or {}).get("Hostname") or container_id[:12])
            guess = self._guesses[container_id] = (host, worker_node_name(inspected))
        return guess

    def _node_names(self, container_ids: list[str]) -> dict[str, str]:
        """Celery node names of containers, confirmed by the workers themselves where possible.

        The command line does not always tell (a start script may pass ``-n "$QUEUE@%h"``), but
        every worker named with ``%h`` (or by default) has the container's hostname after the
        ``@``: one ping broadcast, for containers not yet confirmed, maps replies to containers.
        An unconfirmed worker keeps its parsed name (it may still be starting).
        """
        unknown = [cid for cid in container_ids if cid not in self._nodes]
        if unknown:
            hosts = {cid: self._guess(cid)[0] for cid in unknown}
            named = names_by_host(self.app, hosts.values(), timeout_s=self._inspect_timeout_s)
            for cid, host in hosts.items():
                if host in named:
                    self._nodes[cid] = named[host]
        return {cid: self._nodes.get(cid) or self._guess(cid)[1] for cid in container_ids}

    # -- scaling up: clones of replica 1 --------------------------------------------------------

    def _template(self, service: str, containers: list[ComposeContainer]) -> dict[str, Any]:
        """The inspected config to clone: lowest-numbered live replica, else any, else cached."""
        ordered = sorted(containers, key=lambda c: (not c.live, c.number))
        if ordered:
            self._templates[service] = self._inspect(ordered[0].id)
        template = self._templates.get(service)
        if template is None:
            raise BackendError(
                f"service {service!r} has no container in project {self.project!r} labelled "
                f"{MANAGED_LABEL}=true to clone: start it once with `docker compose up`"
            )
        self._refuse_unsafe(service, template)
        return template

    def _refuse_unsafe(self, service: str, template: dict[str, Any]) -> None:
        """BackendError naming the container and each setting that reaches the host (reported
        once as a "clone-refused" event): the service is held, nothing is started from it."""
        spec = self._specs.get(service)
        allow = (*(spec.allowed_bind_mounts if spec else ()), *self._extra_binds)
        problems = unsafe_settings(template, allow)
        if not problems:
            return
        name = str(template.get("Name", "?")).lstrip("/")
        self._report_refusal(
            service,
            f"refusing to clone {name} (service {service!r}): {'; '.join(problems)}; fix the "
            "service's definition (docs/security.md), nothing is started from it until then",
        )

    def _report_refusal(self, service: str, detail: str) -> NoReturn:
        """A "clone-refused" event (once per distinct refusal), health's last error, and the
        BackendError that holds the service."""
        if self._refused.get(service) != detail:
            self._refused[service] = detail
            self._note(service, "clone-refused", detail)
        self._engine.last_error = detail
        raise BackendError(detail)

    def _scale_up(
        self, service: str, containers: list[ComposeContainer], count: int, fence: Fence = UNFENCED
    ) -> tuple[str, ...]:
        started: list[str] = []
        errors: list[str] = []
        if not self._backoff.may_start(service):
            return ()  # a crash loop: nothing starts until its backoff runs out (see health())
        # Checked first: a parked replica of an unsafe service is not woken either.
        template = self._template(service, containers)
        # Wake parked replicas (stopped by a warm shutdown) first: they are the service's own.
        sleeping = [c for c in containers if not c.live and (c.id in self._parked or not c.died)]
        for parked in sleeping[:count]:
            if self._born_warm(parked.id):  # it would boot consuming nothing: re-created cold
                try:  # the gate removes it once the clone is composed (it may be the template)
                    clone = self._clone(service, template, parked.number, fence, replaces=parked.id)
                    self._parked.discard(parked.id)
                    started.append(clone)
                except BackendError as exc:
                    errors.append(str(exc))
                continue
            try:
                self._call(f"start {parked.name}", partial(_start, parked.id), fence)
                self._backoff.started(service)
                self._parked.discard(parked.id)
                started.append(parked.name)
            except BackendError as exc:
                errors.append(str(exc))
        if len(started) < count:
            number = max((c.number for c in containers), default=0)
            while len(started) < count and len(errors) < self._attempts:
                number += 1
                try:
                    started.append(self._clone(service, template, number, fence))
                except BackendError as exc:
                    errors.append(str(exc))
        if errors:
            self._engine.last_error = "; ".join(errors)
            if not started:
                raise BackendError(f"scale up {service!r}: {self._engine.last_error}")
            self._note(service, "scale-up-partial", self._engine.last_error)
        return tuple(started)

    def _clone(
        self,
        service: str,
        template: dict[str, Any],
        number: int,
        fence: Fence = UNFENCED,
        *,
        warm: bool = False,
        replaces: str | None = None,
    ) -> str:
        """Have the gate create ``{project}-{service}-{number}`` from the service's replica, then
        start it; ``warm``: for the pool (booting without consuming, recorded before it starts);
        ``replaces``: the stopped or dead container holding the number, which the gate removes.

        The gate composes the clone (``POST /gate/v1/replicas``, scaler/gate/clone.py): the
        template's inspected configuration with only the name, number, hostname and warm flag
        changed, its networks connected. A template the gate refuses (403: it reaches the host)
        is reported as "clone-refused" like the backend's own check (``_refuse_unsafe``)."""
        wanted: dict[str, Any] = {"service": service, "number": number, "warm": warm}
        if replaces is not None:
            wanted["replaces"] = replaces
        try:
            created = self._call(
                f"create {self.project}-{service}-{number}", partial(_create_replica, wanted), fence
            )
        except GateRefused as exc:
            self._report_refusal(service, str(exc))
        cid, name = str(created["Id"]), str(created["Name"])
        try:
            if warm:
                self._pool.enlist(service, cid, fence)  # before it runs: never taken for serving
            self._call(f"start {name}", partial(_start, cid), fence)
        except (BackendError, LeadershipLost):
            # Leave no half-made container behind for the next count to trip over (a created,
            # never started container is not a worker: removing it races nobody).
            try:
                self._call(f"remove {name}", lambda cl: cl.api.remove_container(cid, force=True))
            except BackendError:
                log.warning("could not remove the failed clone %s", name)
            raise
        self._backoff.started(service)
        if warm:
            resolve = partial(self._resolve_node, cid)
            self._pool.watch(service, cid, resolve, self._specs[service].queues, fence)
        log.info("started %s%s (clone of %s)", "warm " if warm else "", name,
                 template.get("Name", "?").lstrip("/"))  # fmt: skip
        return name

    def _born_warm(self, container_id: str) -> bool:
        """Was the container created for the warm pool (it boots consuming nothing)?"""
        env = (self._inspect(container_id).get("Config") or {}).get("Env") or []
        return f"{WARM_ENV}=1" in env

    # -- scaling down: drain idle workers -------------------------------------------------------

    def _busy(self, nodes: list[str]) -> dict[str, bool | None]:
        """Per node: True if it runs or holds a task, False if idle, None if it did not answer."""
        return ask_busy(self.app, nodes, timeout_s=self._inspect_timeout_s,
                        attempts=self._attempts, backoff_s=self._backoff_s)  # fmt: skip

    def _scale_down(
        self,
        service: str,
        live: list[ComposeContainer],
        count: int,
        *,
        park: bool,
        fence: Fence = UNFENCED,
        to_pool: int = 0,
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Drain ``count`` idle workers: the first ``to_pool`` back into the warm pool, the
        others to be stopped. Returns the names being stopped and those returning to the pool."""
        nodes = self._node_names([c.id for c in live])
        busy = self._busy(list(nodes.values()))
        idle = removal_order(  # only the idle are drained; among them the highest first
            [c for c in live if busy[nodes[c.id]] is False], lambda c: 0, lambda c: c.number
        )
        chosen = idle[:count]
        if len(chosen) < count:
            held = [
                f"{nodes[c.id]}={'busy' if busy[nodes[c.id]] else 'no answer'}"
                for c in live
                if c not in chosen
            ]
            self._note(
                service,
                "scale-down-held",
                f"wanted to stop {count}, only {len(chosen)} idle; kept: {', '.join(held)}",
            )
        pooled, chosen = chosen[:to_pool], chosen[to_pool:]
        keep = min(chosen, key=lambda c: c.number) if park and chosen else None
        for c in pooled:
            thread = threading.Thread(
                target=self._drain_to_pool, args=(service, c, nodes[c.id], fence),
                name=f"to-pool-{c.name}", daemon=True,
            )  # fmt: skip
            with self._lock:
                self._draining[c.id] = thread
                self._to_pool[c.id] = service
            thread.start()
        for c in chosen:
            thread = threading.Thread(
                target=self._drain,
                args=(service, c, nodes[c.id], c is keep, fence),
                name=f"drain-{c.name}",
                daemon=True,
            )
            with self._lock:
                self._draining[c.id] = thread
            thread.start()
        return tuple(c.name for c in chosen), tuple(c.name for c in pooled)

    # -- the warm pool (scaler.backends.warm_pool) ----------------------------------------------

    def _promote(
        self, service: str, pool: list[ComposeContainer], count: int, fence: Fence
    ) -> tuple[str, ...]:
        """Make up to ``count`` ready pool members serve (add_consumer, confirmed)."""
        promoted: list[str] = []
        for c in pool:
            if len(promoted) == count:
                break
            if self._pool.node(c.id) is None:
                continue  # still booting
            if self._pool.promote(service, c.id, self._specs[service].queues, fence) is None:
                promoted.append(c.name)
        return tuple(promoted)

    def _commit(
        self, service: str, pool: list[ComposeContainer], need: int, warm: int | None, fence: Fence
    ) -> tuple[str, ...]:
        """Take booting members the pool is about to lose as serving (``WarmPool.commit``), up
        to ``need``: no cold container beside a member being stopped (serving + warm over max)."""
        if warm is None:
            return ()
        with self._lock:
            pooling = sum(1 for svc in self._to_pool.values() if svc == service)
        booting = [c for c in pool if self._pool.node(c.id) is None]
        taken: list[str] = []
        for c in booting[: commit_count(need, len(booting), len(pool) + pooling, warm)]:
            resolve = partial(self._resolve_node, c.id)
            if self._pool.commit(service, c.id, resolve, self._specs[service].queues, fence):
                taken.append(c.name)
        return tuple(taken)

    def _size_pool(
        self,
        service: str,
        containers: list[ComposeContainer],
        pool: list[ComposeContainer],
        warm: int,
        fence: Fence,
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Refill the pool with clones started warm, or stop the excess (booting ones first);
        drains on their way into the pool count as members."""
        with self._lock:
            have = len(pool) + sum(1 for svc in self._to_pool.values() if svc == service)
        if have < warm:
            if not self._backoff.may_start(service):
                return (), ()
            template = self._template(service, containers)
            number = max((c.number for c in containers), default=0)
            started = []
            for n in range(number + 1, number + 1 + warm - have):
                started.append(self._clone(service, template, n, fence, warm=True))
            return tuple(started), ()
        excess = trim_order(pool, lambda c: self._pool.node(c.id) is not None, lambda c: c.number)
        stopping = excess[: max(0, have - warm)]
        for c in stopping:
            thread = threading.Thread(
                target=self._release, args=(service, c, fence), name=f"release-{c.name}",
                daemon=True,
            )  # fmt: skip
            with self._lock:
                self._draining[c.id] = thread
            thread.start()
        return (), tuple(c.name for c in stopping)

    def _drain_to_pool(
        self, service: str, container: ComposeContainer, node: str, fence: Fence
    ) -> None:
        """Cancel the worker's consumers (confirmed), wait until idle, record it as warm; one
        still busy at the drain timeout gets its consumers back and serves."""
        queues = self._specs[service].queues
        try:
            problem = set_consumers(self.app, node, queues, add=False, fence=fence,
                                    timeout_s=self._inspect_timeout_s * 5)  # fmt: skip
            deadline = time.monotonic() + self._drain_timeout_s
            while problem is None:
                fence.check(f"drain {container.name} to the warm pool")
                if self._busy([node])[node] is False:
                    self._pool.admit(service, container.id, node, fence)
                    self._note(service, "returned-to-pool", f"{container.name} ({node}): warm")
                    return
                if time.monotonic() > deadline:
                    problem = f"still busy after {self._drain_timeout_s:g} s"
                    break
                time.sleep(0.5)
            set_consumers(self.app, node, queues, add=True, fence=fence,
                          timeout_s=self._inspect_timeout_s * 5)  # fmt: skip
            self._note(service, "to-pool-aborted", f"{container.name} ({node}): {problem}")
        except LeadershipLost as exc:
            self._note(service, "fenced", f"{container.name} ({node}): {exc}")
            with self._lock:
                self._suspects.add(container.id)
        except Exception as exc:
            self._note(service, "to-pool-error", f"{container.name} ({node}): {exc}")
            with self._lock:
                self._suspects.add(container.id)
        finally:
            with self._lock:
                self._draining.pop(container.id, None)
                self._to_pool.pop(container.id, None)
                self._snapshot = None
                self._generation += 1

    def _release(self, service: str, container: ComposeContainer, fence: Fence) -> None:
        """Stop and remove an idle warm member (the pool is trimmed), then drop it."""
        client = self._factory()
        try:
            info = client.api.inspect_container(container.id)
            stop_fenced(client, container.id, info, fence, f"warm {container.name}")
            fence.check(f"remove warm {container.name}")
            client.api.remove_container(container.id)
            self._pool.leave(service, container.id)
            self._note(service, "warm-stopped", f"{container.name}: pool trimmed")
        except LeadershipLost as exc:
            self._note(service, "fenced", f"warm {container.name}: {exc}")
        except Exception as exc:  # a leftover member is pruned once its container is gone
            self._note(service, "warm-stop-error", f"{container.name}: {exc}")
        finally:
            client.close()
            with self._lock:
                self._draining.pop(container.id, None)
                self._snapshot = None
                self._generation += 1
            self._nodes.pop(container.id, None)
            self._guesses.pop(container.id, None)

    def _resolve_node(self, container_id: str) -> str | None:
        """The node name of a (warm) clone once its worker answers: named like the service's
        other workers (``<name>@<its hostname>``), asked directly, else a ping broadcast."""
        if container_id in self._nodes:
            return self._nodes[container_id]
        host, guess = self._guess(container_id)
        candidates = {guess, *(f"{n.split('@', 1)[0]}@{host}" for n in list(self._nodes.values()))}
        try:
            replies = self.app.control.ping(
                destination=sorted(candidates), timeout=self._inspect_timeout_s, limit=1
            )
        except Exception as exc:
            log.warning("ping of %s failed: %s", sorted(candidates), exc)
            replies = []
        for node in (n for reply in replies or [] for n in reply):
            self._nodes[container_id] = node
            return str(node)
        self._node_names([container_id])  # a broadcast: confirms it if it answers at all
        return self._nodes.get(container_id)

    def _reconcile_pool(
        self, listing: dict[str, list[ComposeContainer]], draining: set[str], fence: Fence
    ) -> tuple[list[BackendEvent], dict[str, set[str]]]:
        """Remove dead or stopped members (the next decision refills the pool), drop members
        whose container is gone, watch booting (or adopted) members until they answer, and
        correct ready ones whose consumer came back. Also returns each service's members."""
        events: list[BackendEvent] = []
        members: dict[str, set[str]] = {}
        for service, containers in listing.items():
            try:
                mine = self._pool.members(service)
                for c in containers:
                    if c.id in mine and not c.live and c.id not in draining:
                        fence.check(f"remove warm {c.name} ({c.state})")
                        self._call(f"remove {c.name}", partial(_remove, c.id), fence)
                        self._pool.leave(service, c.id)
                        events.append(BackendEvent(service, "warm-died", f"{c.name} {c.state}"))
                alive = {c.id for c in containers if c.live}
                gone = self._pool.prune(service, alive | draining, fence)
                if gone:
                    events.append(BackendEvent(service, "warm-gone", f"dropped {gone}"))
                mine = members[service] = self._pool.members(service)
                for cid in mine - draining:
                    resolve = partial(self._resolve_node, cid)
                    self._pool.watch(service, cid, resolve, self._specs[service].queues, fence)
                self._pool.check(service, self._specs[service].queues, fence)
            except LeadershipLost as exc:
                events.append(BackendEvent(service, "fenced", f"warm pool: {exc}"))
            except Exception as exc:  # the store, the engine or the broker: next reconcile
                detail = f"{type(exc).__name__}: {exc}; checked again at the next reconcile"
                events.append(BackendEvent(service, "warm-check-failed", detail))
        if events:
            self._invalidate()
        return events, members

    def _drain(
        self,
        service: str,
        container: ComposeContainer,
        node: str,
        park: bool,
        fence: Fence = UNFENCED,
        *,
        answers: bool = True,
        template: dict[str, Any] | None = None,
    ) -> None:
        """Cancel the worker's consumers, wait until it is idle, warm-stop it, remove it; with
        a ``template``, start a clone of it in the container's place (an unresponsive worker;
        one that does not ``answers`` a ping is stopped without the cancel and the wait).

        If it ends early after a cancel may have reached the worker (aborted, fenced, or an
        error), the container is a suspect: the next reconcile gives it its queues back if it
        consumes none.
        """
        stopped = False
        try:
            spec = self._specs.get(service)
            queues = spec.queues if spec and answers else ()
            for queue in queues:
                fence.check(f"cancel {node}'s consumer of {queue}")
                replies = self.app.control.cancel_consumer(
                    queue, destination=[node], reply=True, timeout=self._inspect_timeout_s * 5
                )
                if not any(node in reply for reply in replies or []):
                    self._note(service, "drain-aborted", f"{node} did not confirm leaving {queue}")
                    return
            deadline = time.monotonic() + self._drain_timeout_s
            while answers:
                fence.check(f"drain {container.name}")  # a drain outlives no leadership
                try:
                    busy = self._busy([node])[node]
                except BackendError as exc:
                    busy, detail = None, str(exc)
                else:
                    detail = "no answer"
                if busy is False:
                    break
                if time.monotonic() > deadline:
                    self._note(service, "drain-timeout", f"{node} still {detail}: stopping it")
                    break
                time.sleep(0.5)
            client = self._factory()  # own connection: the stop takes up to the grace period
            try:
                info = client.api.inspect_container(container.id)
                fence.check(f"stop {container.name}")
                if park:
                    self._parked.add(container.id)  # even if the grace period runs out
                stop_fenced(client, container.id, info, fence, container.name)
                stopped = True
                # A warm shutdown leaves nothing unacked; one killed past its grace may.
                host = str((info.get("Config") or {}).get("Hostname") or "")
                restored = restore_dead_workers(
                    self.restorer, service, [node], "stopped", hosts=[host] if host else []
                )
                if restored is not None:
                    with self._lock:
                        self._events.append(restored)
                # A replacement's clone removes it (the gate composes the clone first: it may
                # be the service's only container, its template).
                if not park and template is None:
                    fence.check(f"remove {container.name}")
                    client.api.remove_container(container.id)
            finally:
                client.close()
            what = "stopped and kept to wake from zero" if park else "stopped and removed"
            if template is not None:
                what = self._replace_stopped(service, container, template, fence, answers)
            self._note(service, "drained" if template is None else "replaced-unresponsive",
                       f"{container.name} ({node}) {what}")  # fmt: skip
        except LeadershipLost as exc:
            self._note(service, "fenced", f"{container.name} ({node}): {exc}")
        except Exception as exc:
            self._note(service, "drain-error", f"{container.name} ({node}): {exc}")
        finally:
            with self._lock:
                # One step: a read sees either this drain still on or the listing dropped.
                self._draining.pop(container.id, None)
                self._snapshot = None
                self._generation += 1
                if not stopped:
                    self._suspects.add(container.id)
            if not park and stopped:
                self._nodes.pop(container.id, None)
                self._guesses.pop(container.id, None)

    def _replace_stopped(
        self,
        service: str,
        container: ComposeContainer,
        template: dict[str, Any],
        fence: Fence,
        answered: bool,
    ) -> str:
        """Start a clone in the place of an unresponsive container just stopped: the gate removes
        the stopped one once it has composed the clone (``replaces``), which takes its number."""
        how = "drained, stopped and removed" if answered else "no ping answer: stopped, removed"
        self._backoff.forget(service, container.id)
        if not self._backoff.may_start(service):
            if self._only_one(service, container):
                # The service's template (the gate clones only from a container it can read):
                # kept stopped, woken by the next scale-up.
                self._parked.add(container.id)
                kept = "drained and stopped" if answered else "no ping answer: stopped"
                return f"{kept}, kept; no clone while the service's crash backoff runs"
            fence.check(f"remove {container.name}")
            self._call(f"remove {container.name}", partial(_remove, container.id), fence)
            return f"{how}; no clone while the service's crash backoff runs"
        name = self._clone(service, template, container.number, fence, replaces=container.id)
        return f"{how}; started {name}"

    def _only_one(self, service: str, container: ComposeContainer) -> bool:
        """Is ``container`` the service's only container (the engine's view, not the cycle's)?"""
        filters = {
            "label": [
                f"{PROJECT_LABEL}={self.project}",
                f"{MANAGED_LABEL}=true",
                f"{SERVICE_LABEL}={service}",
            ]
        }
        rows = self._call(
            f"list {service}", lambda client: client.api.containers(all=True, filters=filters)
        )
        return not any(
            row["Id"] != container.id
            and (row.get("Labels") or {}).get(ONEOFF_LABEL, "False") == "False"
            for row in rows
        )

    # -- workers whose heartbeat stopped -------------------------------------------------------

    def _replace_unresponsive(
        self, listing: dict[str, list[ComposeContainer]], draining: set[str], fence: Fence
    ) -> list[BackendEvent]:
        """Start a replacement thread for each live container whose heartbeat is older than its
        service's bound (only unhealthy ones are inspected: the listing tells which)."""
        events: list[BackendEvent] = []
        now = time.time()
        for service, containers in listing.items():
            spec = self._specs.get(service)
            bound = spec.unresponsive_after_s if spec else None
            suspects = [c for c in containers if c.live and c.unhealthy and c.id not in draining]
            if bound is None or not suspects:
                continue
            for c in suspects:
                try:
                    age = heartbeat_age_s(self._inspect(c.id), now)
                    if age is None or age <= bound:
                        continue
                    node = self._node_names([c.id])[c.id]
                    replies = self.app.control.ping(
                        destination=[node], timeout=self._inspect_timeout_s
                    )
                    template = self._template(service, containers)
                except Exception as exc:  # the engine or the broker: judged again next cycle
                    detail = f"{c.name}: {type(exc).__name__}: {exc}; checked again next cycle"
                    events.append(BackendEvent(service, "unresponsive-check-failed", detail))
                    continue
                answers = any(node in reply for reply in replies or [])
                events.append(
                    BackendEvent(
                        service,
                        "unresponsive",
                        f"{c.name} ({node}): heartbeat {age:.0f} s old (bound {bound:g} s), "
                        f"{'answers a ping: draining' if answers else 'no ping answer: stopping'}"
                        " it, then a replacement",
                    )
                )
                thread = threading.Thread(
                    target=self._drain,
                    args=(service, c, node, False, fence),
                    kwargs={"answers": answers, "template": template},
                    name=f"replace-{c.name}",
                    daemon=True,
                )
                with self._lock:
                    self._draining[c.id] = thread
                thread.start()
        if events:
            self._invalidate()
        return events

    # -- workers left consuming nothing --------------------------------------------------------

    def _restore_stranded(
        self,
        listing: dict[str, list[ComposeContainer]],
        draining: set[str],
        fence: Fence = UNFENCED,
    ) -> list[BackendEvent]:
        """The standing consumer check (scaler.backends.stranded) over every live worker neither
        warm nor draining: heal those consuming none of their queues, replace a relapse."""
        with self._lock:
            adopting, self._adopt_pending = self._adopt_pending, False
            self._suspects.clear()  # a drain cut short: checked like everyone, every reconcile
        committed = self._pool.committed()  # their watch gives them their queues
        live = {
            c.id: c
            for cs in listing.values()
            for c in cs
            if c.live and c.id not in draining and c.id not in committed
        }
        try:
            # On adoption one ping broadcast confirms the names; after that the confirmed name,
            # else the command line's (a wrong guess never answers: the check skips it).
            nodes = (
                self._node_names(list(live))
                if adopting
                else {cid: self._nodes.get(cid) or self._guess(cid)[1] for cid in live}
            )
        except Exception as exc:  # the engine or the broker: checked again at the next reconcile
            with self._lock:
                self._adopt_pending = adopting
            services = ",".join(sorted({c.service for c in live.values()}))
            detail = f"{type(exc).__name__}: {exc}; checked again at the next reconcile"
            return [BackendEvent(services, CHECK_FAILED, detail)]
        container = {nodes[cid]: c for cid, c in live.items()}

        def still_serving(node: str) -> bool:  # under the lock: a drain registers itself first
            cid = container[node].id
            return cid not in self._draining and cid not in self._pool.committed()

        def replace(node: str) -> str:  # under the lock (not reentrant): registered at once
            c = container[node]
            thread = threading.Thread(
                target=self._replace_consumerless, args=(c, node, listing[c.service], fence),
                name=f"replace-{c.name}", daemon=True,
            )  # fmt: skip
            self._draining[c.id] = thread
            self._snapshot, self._generation = None, self._generation + 1
            thread.start()
            return f"replacing {c.name} (drained, stopped, a clone in its place)"

        wanted = {n: (c.service, self._specs[c.service].queues) for n, c in container.items()}
        return self._consumers.run(wanted, lock=self._lock, still_serving=still_serving,
                                   replace=replace, fence=fence)  # fmt: skip

    def _replace_consumerless(
        self, c: ComposeContainer, node: str, containers: list[ComposeContainer], fence: Fence
    ) -> None:
        """A worker a heal did not cure: the unresponsive path (``_drain`` with a template)."""
        try:
            template = self._template(c.service, containers)
        except BackendError as exc:
            self._note(c.service, "replace-failed", f"{c.name} ({node}): {exc}")
            with self._lock:
                self._draining.pop(c.id, None)
                self._snapshot, self._generation = None, self._generation + 1
            return
        self._drain(c.service, c, node, False, fence, answers=True, template=template)

    # -- replacing dead containers --------------------------------------------------------------

    def _replace(
        self,
        service: str,
        dead: ComposeContainer,
        containers: list[ComposeContainer],
        fence: Fence = UNFENCED,
    ) -> BackendEvent:
        detail = f"{dead.name} {dead.state} (exit code {dead.exit_code})"
        log.warning("replacing %s", detail)
        try:
            template = self._template(service, containers)
            # The gate removes the dead one once it has composed the clone (``replaces``): it may
            # be the service's only container, the clone's template.
            name = self._clone(service, template, dead.number, fence, replaces=dead.id)
            self._restored.discard(dead.id)
            self._backoff.forget(service, dead.id)
            self._nodes.pop(dead.id, None)
            self._guesses.pop(dead.id, None)
        except BackendError as exc:
            return BackendEvent(service, "replace-failed", f"{detail}: {exc}")
        except LeadershipLost as exc:
            return BackendEvent(service, "fenced", f"{detail}: {exc}")
        return BackendEvent(service, "replaced", f"{detail}; started {name}")

    def _restore_dead(self, service: str, dead: ComposeContainer) -> list[BackendEvent]:
        """Give back what the dead container's worker held (once per container)."""
        if self.restorer is None:
            return []
        try:
            host = self._guess(dead.id)[0]
        except BackendError as exc:
            return [BackendEvent(service, "restore-failed", f"{dead.name}: hostname: {exc}")]
        # Whatever its worker was named: every owner on the dead container's hostname.
        confirmed = [self._nodes[dead.id]] if dead.id in self._nodes else []
        why = f"{dead.name} {dead.state}, exit code {dead.exit_code}"
        event = restore_dead_workers(self.restorer, service, confirmed, why, hosts=[host])
        if event is None or event.kind != "restore-failed":
            self._restored.add(dead.id)
        return [event] if event is not None else []

    def _note(self, service: str, kind: str, detail: str) -> None:
        log.info("%s %s: %s", service, kind, detail)
        with self._lock:
            self._events.append(BackendEvent(service, kind, detail))
