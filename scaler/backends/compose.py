"""The Docker Compose backend: scales a Compose service by adding and removing its containers.

Compose has no "scale to N" API of its own that a sidecar could call, so this backend does what
`docker compose up --scale` does, through the Docker engine API:

- A service is managed only if its containers carry the project's Compose labels and the opt-in
  label ``autoscale.managed=true``, and the policy names it. Nothing else is ever touched.
- Scale up clones the inspected configuration of the service's lowest-numbered running replica
  (image, command, environment, mounts, networks, labels) through the low-level API, changing only
  the name ``{project}-{service}-{N}``, the container-number label and the network aliases. The
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
- Container CPU is read in percent of the container's CPU limit (``cpus``), inspected once per
  container when its stats reader starts.
- Engine and broker errors are retried with a short backoff, then raised as BackendError and shown
  in health(): the loop holds, and nothing is ever stopped on data that could not be read.
- One container listing per loop cycle: after ``begin_cycle()`` the first listing (reconcile's, or
  the first read's) is shared by the cycle's reads (``replicas``, ``workers``), a failed one too
  (the cycle holds without asking again). ``scale`` and ``reconcile`` always list afresh, and
  every action (scale, replacement, a drain ending, ``manage``) drops the shared listing. Without
  ``begin_cycle()`` (tests, one-off callers) every read lists.
- Adoption: the first reconcile after ``manage()`` (a scaler start, a standby taking over) asks
  the live workers which queues they consume and gives the ones consuming none back their
  queues (``scaler.backends.stranded``), so a worker whose drain was cut short by a scaler's
  death takes work again; a worker whose own drain here failed after the cancel is checked the
  same way at the next reconcile.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from celery import Celery

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
ClientFactory = Callable[[], docker.DockerClient]
TRANSIENT = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


@dataclass(frozen=True)
class ComposeContainer:
    """One container of a managed service, as the engine's container list shows it."""

    id: str
    name: str
    service: str
    number: int
    state: str  # Docker's: running, exited, created, restarting, paused, dead, removing
    exit_code: int | None  # for exited containers, parsed from the list's status text

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


# The mount of /etc/hostname (4th and 5th fields of a mountinfo line). Only that one: the host's
# own namespace also lists /var/lib/docker/containers/<id>/mounts/shm of other containers.
_CONTAINER_ID = re.compile(r"/containers/([0-9a-f]{64})/hostname /etc/hostname ")


def own_container_ids(mountinfo: str, hostname: str) -> list[str]:
    """Candidate ids of the container this process runs in, best first.

    Docker bind-mounts /etc/hostname from ``/var/lib/docker/containers/<id>/hostname``, so
    /proc/self/mountinfo names the full id even when the service sets its own hostname; Docker's
    default hostname (the short id) is the fallback.
    """
    ids = list(dict.fromkeys(_CONTAINER_ID.findall(mountinfo)))
    if re.fullmatch(r"[0-9a-f]{12,64}", hostname) and hostname not in ids:
        ids.append(hostname)  # only an id: a name could match some other container
    return ids


def own_compose_project(
    client_factory: ClientFactory | None = None,
    *,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    hostname: str | None = None,
) -> str:
    """The Compose project of the container this scaler runs in, from its own labels.

    Lets the stack's scaler follow whatever project name Compose was given (``-p``,
    COMPOSE_PROJECT_NAME, or the file's ``name:``) without every Compose version having to
    interpolate it into the command. Raises ValueError naming what was tried.
    """
    try:
        text = mountinfo.read_text()
    except OSError:
        text = ""
    host = hostname if hostname is not None else os.environ.get("HOSTNAME", "")
    candidates = own_container_ids(text, host)
    client = (client_factory or default_client_factory())()
    try:
        for ref in candidates:
            try:
                labels = client.api.inspect_container(ref)["Config"].get("Labels") or {}
            except docker.errors.NotFound:
                continue
            project = labels.get(PROJECT_LABEL)
            if project:
                return str(project)
    finally:
        client.close()
    raise ValueError(
        f"this process is not in a container with a {PROJECT_LABEL} label "
        f"(tried container ids {[c[:12] for c in candidates]}): pass the project name"
    )


def _start(container_id: str, client: docker.DockerClient) -> None:
    client.api.start(container_id)


def _connect(
    container_id: str, network: str, aliases: list[str], client: docker.DockerClient
) -> None:
    client.api.connect_container_to_network(container_id, network, aliases=aliases)


def default_client_factory(docker_host: str | None = None, timeout_s: int = 30) -> ClientFactory:
    """A factory for engine clients: DOCKER_HOST and friends from the environment, or a URL."""

    def make() -> docker.DockerClient:
        if docker_host is None:
            return docker.from_env(timeout=timeout_s)
        return docker.DockerClient(base_url=docker_host, timeout=timeout_s)

    return make


class ComposeBackend:
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
        self.project = project
        self.app = app
        self._factory = client_factory or default_client_factory()
        self._drain_timeout_s = drain_timeout_s
        self._inspect_timeout_s = inspect_timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._client: docker.DockerClient | None = None
        self._specs: dict[str, ServiceSpec] = {}
        self._lock = threading.Lock()
        self._draining: dict[str, threading.Thread] = {}  # container id -> drain thread
        self._events: list[BackendEvent] = []
        self._nodes: dict[str, str] = {}  # container id -> Celery node name, confirmed
        self._guesses: dict[str, tuple[str, str]] = {}  # container id -> (hostname, parsed name)
        self._parked: set[str] = set()  # stopped by us to wake from zero, whatever its exit code
        self._templates: dict[str, dict[str, Any]] = {}  # service -> last inspected replica
        self._last: dict[str, list[ComposeContainer]] = {}  # last listing, for resources()
        self._last_error: str = ""
        # The cycle's shared listing (or the error listing it raised); see the module docstring.
        # _generation counts invalidations, so a listing taken across one is never stored.
        self._in_cycle = False
        self._snapshot: dict[str, list[ComposeContainer]] | BackendError | None = None
        self._generation = 0
        self._adopt_pending = True  # check every live worker's consumers at the next reconcile
        self._suspects: set[str] = set()  # container ids whose drain stopped after the cancel
        self._stats = ContainerStats(lambda: self._factory().api, stale_after_s=stats_stale_after_s)
        self._limits: dict[str, float | None] = {}  # container id -> CPU limit in CPUs, or None
        self._backoff = restart_backoff or RestartBackoff()
        # Gives a dead worker's unacked messages back at once (scaler.restore); None: not Redis.
        self.restorer = restorer
        self._restored: set[str] = set()  # dead container ids whose messages were given back

    # -- the Backend interface ---------------------------------------------------------------

    def manage(self, specs: Sequence[ServiceSpec]) -> None:
        """Manage exactly these services (the policy's); any other container is never touched."""
        for spec in specs:
            if not spec.name:
                raise ValueError(f"service name {spec.name!r}: expected a non-empty name")
        with self._lock:
            self._specs = {spec.name: spec for spec in specs}
            self._adopt_pending = True
        self._invalidate()

    def begin_cycle(self) -> None:
        """Start a cycle: the next listing is taken afresh and shared by the cycle's reads."""
        with self._lock:
            self._in_cycle = True
        self._invalidate()

    def services(self) -> list[str]:
        return list(self._specs)

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
            out.append(WorkerInfo(service=service, name=node, ident=c.id, state=state))
        return out

    def replicas(self, service: str) -> int:
        """Live containers that are not draining; BackendError when the engine cannot be read."""
        draining, containers = self._view(service)
        return sum(1 for c in containers if c.live and c.id not in draining)

    def scale(self, service: str, replicas: int) -> ScaleResult:
        if replicas < 0:
            raise ValueError(f"replicas={replicas!r} for service {service!r}: expected >= 0")
        self._check_managed(service)
        draining = self._draining_ids()
        containers = self._list()[service]  # never act on the cycle's shared listing
        live = [c for c in containers if c.live and c.id not in draining]
        before = len(live)
        try:
            if replicas > before:
                started = self._scale_up(service, containers, replicas - before)
                return ScaleResult(service, before, before + len(started), started=started)
            if replicas < before:
                chosen = self._scale_down(service, live, before - replicas, park=replicas == 0)
                return ScaleResult(service, before, before - len(chosen), draining=chosen)
            return ScaleResult(service, before, before)
        finally:
            self._invalidate()

    def reconcile(self) -> list[BackendEvent]:
        """Replace dead containers, keep one stats reader per live container, report drains,
        and give stranded workers their queues back (on adoption, and after a failed drain)."""
        draining = self._draining_ids()
        listing = self._list()  # afresh; it becomes the cycle's shared listing
        events: list[BackendEvent] = []
        for service in self._specs:
            skip = draining | self._parked
            dead = [c for c in listing.get(service, []) if c.died and c.id not in skip]
            for c in dead:
                if not self._backoff.knows(service, c.id):
                    self._backoff.exited(service, c.id, self._lifetime(c))
                if c.id not in self._restored:  # before any replacement starts
                    events += self._restore_dead(service, c)
            if not self._backoff.may_start(service):
                continue  # a crash loop: the dead stay until the backoff runs out
            for c in dead:
                events.append(self._replace(service, c, listing.get(service, [])))
        if events:
            self._invalidate()  # the listing still shows the dead, not their replacements
        events = self._backoff.events() + events
        events += self._restore_stranded(listing, draining)
        live = [c.id for cs in listing.values() for c in cs if c.live]
        limits = self._cpu_limits(live)
        self._stats.track((cid for cid in live if cid in limits), limits)
        with self._lock:
            events, self._events = [*self._events, *events], []
        return events

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
        if self._last_error:
            extra["last_error"] = self._last_error
        return BackendHealth(True, "", extra)

    def close(self) -> None:
        """Stop the stats readers and drop the client; containers and drains are left running."""
        self._stats.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- reading the engine --------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[docker.DockerClient], T]) -> T:
        """Run one engine call, retrying transient errors with backoff; BackendError at the end.

        Client errors (4xx: not found, conflict) are not transient and are raised at once.
        """
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                if self._client is None:
                    self._client = self._factory()
                result = fn(self._client)
                self._last_error = ""
                return result
            except docker.errors.APIError as exc:
                if exc.is_client_error() or attempt == self._attempts:
                    self._last_error = f"{what}: {exc}"
                    raise BackendError(self._last_error) from exc
            except TRANSIENT as exc:
                if attempt == self._attempts:
                    self._last_error = f"{what}: {type(exc).__name__}: {exc}"
                    raise BackendError(self._last_error) from exc
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _invalidate(self) -> None:
        """Drop the cycle's shared listing: something changed, or may have, since it was taken."""
        with self._lock:
            self._snapshot = None
            self._generation += 1

    def _view(self, service: str) -> tuple[set[str], list[ComposeContainer]]:
        """Draining ids and the service's containers, for reads: the cycle's shared listing if
        there is one (read together with the draining set, which a drain's end changes only
        together with dropping the listing), else a fresh one."""
        self._check_managed(service)
        with self._lock:
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
            rows = self._call(
                "list containers", lambda client: client.api.containers(all=True, filters=filters)
            )
        except BackendError as exc:
            self._share(generation, exc)
            raise
        grouped: dict[str, list[ComposeContainer]] = {name: [] for name in self._specs}
        for row in rows:
            labels = row.get("Labels") or {}
            service = labels.get(SERVICE_LABEL, "")
            if service not in grouped or labels.get(ONEOFF_LABEL, "False") != "False":
                continue  # not named by the policy, or a `docker compose run` one-off
            match = _EXITED.search(row.get("Status") or "")
            grouped[service].append(
                ComposeContainer(
                    id=row["Id"],
                    name=(row.get("Names") or ["/?"])[0].lstrip("/"),
                    service=service,
                    number=int(labels.get(NUMBER_LABEL, "0") or 0),
                    state=str(row.get("State", "")),
                    exit_code=int(match.group(1)) if match else None,
                )
            )
        for cs in grouped.values():
            cs.sort(key=lambda c: c.number)
        self._last = grouped
        self._share(generation, grouped)
        return grouped

    def _share(
        self, generation: int, listing: dict[str, list[ComposeContainer]] | BackendError
    ) -> None:
        with self._lock:
            if self._in_cycle and generation == self._generation:
                self._snapshot = listing

    def _check_managed(self, service: str) -> None:
        if service not in self._specs:
            raise BackendError(
                f"service {service!r} is not managed here (policy names: {sorted(self._specs)})"
            )

    def _draining_ids(self) -> set[str]:
        with self._lock:
            return set(self._draining)

    def _inspect(self, container_id: str) -> dict[str, Any]:
        return self._call(
            f"inspect container {container_id[:12]}",
            lambda client: client.api.inspect_container(container_id),
        )

    def _lifetime(self, container: ComposeContainer) -> float | None:
        """How long a dead container ran, from the engine; None when it cannot be read."""
        try:
            return lifetime_s(self._inspect(container.id))
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
                self._limits[cid] = cpu_limit(self._inspect(cid))
            except BackendError as exc:
                log.warning("no CPU limit for %s yet: %s", cid[:12], exc)
        for gone in set(self._limits) - set(container_ids):
            del self._limits[gone]
        return {cid: self._limits[cid] for cid in container_ids if cid in self._limits}

    def _guess(self, container_id: str) -> tuple[str, str]:
        """The container's hostname and the node name its command line suggests."""
        guess = self._guesses.get(container_id)
        if guess is None:
            inspected = self._inspect(container_id)
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
            try:
                replies = self.app.control.ping(timeout=self._inspect_timeout_s) or []
            except Exception as exc:
                log.warning("ping broadcast to name workers failed: %s", exc)
                replies = []
            answered = [node for reply in replies for node in reply]
            for cid in unknown:
                host = self._guess(cid)[0]
                found = [n for n in answered if n.split("@", 1)[-1].split(".", 1)[0] == host]
                if len(found) == 1:
                    self._nodes[cid] = found[0]
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
        return template

    def _scale_up(
        self, service: str, containers: list[ComposeContainer], count: int
    ) -> tuple[str, ...]:
        started: list[str] = []
        errors: list[str] = []
        if not self._backoff.may_start(service):
            return ()  # a crash loop: nothing starts until its backoff runs out (see health())
        # Wake parked replicas (stopped by a warm shutdown) first: they are the service's own.
        sleeping = [c for c in containers if not c.live and (c.id in self._parked or not c.died)]
        for parked in sleeping[:count]:
            try:
                self._call(f"start {parked.name}", partial(_start, parked.id))
                self._backoff.started(service)
                self._parked.discard(parked.id)
                started.append(parked.name)
            except BackendError as exc:
                errors.append(str(exc))
        if len(started) < count:
            template = self._template(service, containers)
            number = max((c.number for c in containers), default=0)
            while len(started) < count and len(errors) < self._attempts:
                number += 1
                try:
                    started.append(self._clone(service, template, number))
                except BackendError as exc:
                    errors.append(str(exc))
        if errors:
            self._last_error = "; ".join(errors)
            if not started:
                raise BackendError(f"scale up {service!r}: {self._last_error}")
            self._note(service, "scale-up-partial", self._last_error)
        return tuple(started)

    def _clone(self, service: str, template: dict[str, Any], number: int) -> str:
        """Create and start ``{project}-{service}-{number}`` from a replica's inspected config."""
        name = f"{self.project}-{service}-{number}"
        config = dict(template["Config"])
        host_config = dict(template["HostConfig"])
        labels = dict(config.get("Labels") or {})
        labels[NUMBER_LABEL] = str(number)
        config["Labels"] = labels
        if config.get("Hostname") == template["Id"][:12]:
            config.pop("Hostname")  # Docker's default (the id): the clone gets its own
        config["Image"] = self._image_for(template)
        networks: dict[str, Any] = (template.get("NetworkSettings") or {}).get("Networks") or {}
        primary = host_config.get("NetworkMode", "")
        if primary not in networks and networks:
            primary = next(iter(networks))

        def endpoint(network: str) -> dict[str, Any]:
            source = networks.get(network) or {}
            # Compose's aliases; no static addresses (they would clash with the source's).
            return {
                "Aliases": [name, service],
                "Links": source.get("Links"),
                "DriverOpts": source.get("DriverOpts"),
            }

        # API 1.41 accepts one network at creation; the others are connected before start.
        config["HostConfig"] = host_config
        config["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoint(primary)}}
        # StopTimeout (the service's stop_grace_period) is part of the inspected Config and
        # travels with it; the high-level containers.create() would drop it.
        created = self._call(
            f"create {name}",
            lambda cl: cl.api.create_container_from_config(config, name=name),
        )
        cid = created["Id"]
        try:
            for network in networks:
                if network != primary:
                    aliases = endpoint(network)["Aliases"]
                    self._call(
                        f"connect {name} to {network}", partial(_connect, cid, network, aliases)
                    )
            self._call(f"start {name}", partial(_start, cid))
        except BackendError:
            # Leave no half-made container behind for the next count to trip over.
            try:
                self._call(f"remove {name}", lambda cl: cl.api.remove_container(cid, force=True))
            except BackendError:
                log.warning("could not remove the failed clone %s", name)
            raise
        self._backoff.started(service)
        log.info("started %s (clone of %s)", name, template.get("Name", "?").lstrip("/"))
        return name

    def _image_for(self, template: dict[str, Any]) -> str:
        """The image by its name when that still means the replica's image, else by its id."""
        image_id = str(template.get("Image", ""))
        image_name = str((template.get("Config") or {}).get("Image", ""))
        try:
            current = self._call(
                f"inspect image {image_name}", lambda cl: cl.api.inspect_image(image_name)
            )
        except BackendError:
            return image_id or image_name
        return image_name if current.get("Id") == image_id else image_id

    # -- scaling down: drain idle workers -------------------------------------------------------

    def _busy(self, nodes: list[str]) -> dict[str, bool | None]:
        """Per node: True if it runs or holds a task, False if idle, None if it did not answer."""
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                inspect = self.app.control.inspect(
                    destination=nodes, timeout=self._inspect_timeout_s
                )
                active = inspect.active() or {}
                reserved = inspect.reserved() or {}
                break
            except Exception as exc:
                if attempt == self._attempts:
                    raise BackendError(f"ask workers {nodes} for their tasks: {exc}") from exc
                time.sleep(delay)
                delay *= 2
        return {
            node: (bool(active[node]) or bool(reserved[node]))
            if node in active and node in reserved
            else None
            for node in nodes
        }

    def _scale_down(
        self, service: str, live: list[ComposeContainer], count: int, *, park: bool
    ) -> tuple[str, ...]:
        nodes = self._node_names([c.id for c in live])
        busy = self._busy(list(nodes.values()))
        idle = [c for c in live if busy[nodes[c.id]] is False]
        idle.sort(key=lambda c: c.number, reverse=True)  # Compose removes the highest first
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
        keep = min(chosen, key=lambda c: c.number) if park and chosen else None
        for c in chosen:
            thread = threading.Thread(
                target=self._drain,
                args=(service, c, nodes[c.id], c is keep),
                name=f"drain-{c.name}",
                daemon=True,
            )
            with self._lock:
                self._draining[c.id] = thread
            thread.start()
        return tuple(c.name for c in chosen)

    def _drain(self, service: str, container: ComposeContainer, node: str, park: bool) -> None:
        """Cancel the worker's consumers, wait until it is idle, warm-stop it, remove it.

        If it ends early after a cancel may have reached the worker (aborted, or an error), the
        container is a suspect: the next reconcile gives it its queues back if it consumes none.
        """
        stopped = False
        try:
            spec = self._specs.get(service)
            queues = spec.queues if spec else ()
            for queue in queues:
                replies = self.app.control.cancel_consumer(
                    queue, destination=[node], reply=True, timeout=self._inspect_timeout_s * 5
                )
                if not any(node in reply for reply in replies or []):
                    self._note(service, "drain-aborted", f"{node} did not confirm leaving {queue}")
                    return
            deadline = time.monotonic() + self._drain_timeout_s
            while True:
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
            client = self._factory()  # own connection: stop() blocks for up to the grace period
            try:
                info = client.api.inspect_container(container.id)
                grace = int((info.get("Config") or {}).get("StopTimeout") or DEFAULT_STOP_TIMEOUT_S)
                if park:
                    self._parked.add(container.id)  # even if the grace period runs out
                client.api.stop(container.id, timeout=grace)
                stopped = True
                # A warm shutdown leaves nothing unacked; one killed past its grace may.
                restored = restore_dead_workers(self.restorer, service, [node], "stopped")
                if restored is not None:
                    with self._lock:
                        self._events.append(restored)
                if not park:
                    client.api.remove_container(container.id)
            finally:
                client.close()
            what = "stopped and kept to wake from zero" if park else "stopped and removed"
            self._note(service, "drained", f"{container.name} ({node}) {what}")
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

    # -- workers left consuming nothing --------------------------------------------------------

    def _restore_stranded(
        self, listing: dict[str, list[ComposeContainer]], draining: set[str]
    ) -> list[BackendEvent]:
        """On adoption every live worker, else only suspects: re-add the queues of those that
        consume none of their service's (see scaler.backends.stranded for the rule)."""
        with self._lock:
            everyone, suspects = self._adopt_pending, set(self._suspects)
        candidates = {
            c.id: service
            for service, cs in listing.items()
            for c in cs
            if c.live and c.id not in draining and (everyone or c.id in suspects)
        }
        if not candidates:
            with self._lock:
                self._adopt_pending = False
                self._suspects -= suspects
            return []
        try:
            nodes = self._node_names(list(candidates))
            wanted = {nodes[cid]: self._specs[svc].queues for cid, svc in candidates.items()}
            restores = restore_stranded(self.app, wanted, self._inspect_timeout_s)
        except Exception as exc:  # broker or engine trouble: keep the check pending, try again
            log.warning("consumer check of %d workers failed: %s", len(candidates), exc)
            services = ",".join(sorted(set(candidates.values())))
            detail = f"{type(exc).__name__}: {exc}; tried again at the next reconcile"
            return [BackendEvent(services, "consumer-check-failed", detail)]
        container_of = {nodes[cid]: cid for cid in candidates}
        with self._lock:
            self._adopt_pending = False
            self._suspects -= suspects
            self._suspects |= {container_of[r.node] for r in restores if not r.confirmed}
        service_of = {nodes[cid]: svc for cid, svc in candidates.items()}
        return [
            BackendEvent(
                service_of[r.node],
                "consumers-restored" if r.confirmed else "consumers-restore-failed",
                r.detail,
            )
            for r in restores
        ]

    # -- replacing dead containers --------------------------------------------------------------

    def _replace(
        self, service: str, dead: ComposeContainer, containers: list[ComposeContainer]
    ) -> BackendEvent:
        detail = f"{dead.name} {dead.state} (exit code {dead.exit_code})"
        log.warning("replacing %s", detail)
        try:
            template = self._template(service, containers)
            self._call(f"remove {dead.name}", lambda cl: cl.api.remove_container(dead.id))
            self._restored.discard(dead.id)
            self._backoff.forget(service, dead.id)
            self._nodes.pop(dead.id, None)
            self._guesses.pop(dead.id, None)
            name = self._clone(service, template, dead.number)
        except BackendError as exc:
            return BackendEvent(service, "replace-failed", f"{detail}: {exc}")
        return BackendEvent(service, "replaced", f"{detail}; started {name}")

    def _restore_dead(self, service: str, dead: ComposeContainer) -> list[BackendEvent]:
        """Give back what the dead container's worker held (once per container)."""
        if self.restorer is None:
            return []
        try:
            node = self._nodes.get(dead.id) or self._guess(dead.id)[1]
        except BackendError as exc:
            return [BackendEvent(service, "restore-failed", f"{dead.name}: node name: {exc}")]
        why = f"{dead.name} {dead.state}, exit code {dead.exit_code}"
        event = restore_dead_workers(self.restorer, service, [node], why)
        if event is None or event.kind != "restore-failed":
            self._restored.add(dead.id)
        return [event] if event is not None else []

    def _note(self, service: str, kind: str, detail: str) -> None:
        log.info("%s %s: %s", service, kind, detail)
        with self._lock:
            self._events.append(BackendEvent(service, kind, detail))
