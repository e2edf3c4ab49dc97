"""The Docker Swarm backend: sets the replica count of a stack's worker services on a manager.

Swarm has what Compose lacks, a replica count per service and an orchestrator that keeps it
(it reschedules the tasks of a lost node and restarts failed ones), so scaling up is one service
update. Scaling down is where Swarm needs help: when the count drops, the orchestrator picks
which tasks to remove by node balance first and running state second (moby/swarmkit,
manager/orchestrator/replicated/services.go), so it may stop a busy worker. This backend never
lowers the count of running workers: it chooses the idle worker itself and makes its slot
vanish first (docs/swarm.md, "How scale-down stays safe"):

1. choose idle workers (Celery: nothing active, nothing reserved), on the nodes running the most
   replicas of the service first (the balance Swarm itself keeps);
2. drain each: cancel its consumers (confirmed), wait until it runs and holds nothing;
3. ask it to shut down (Celery's ``shutdown`` control command): a warm shutdown, exit code 0;
   the stack's ``restart_policy: condition: on-failure`` makes Swarm leave a task that exited 0
   alone, so its slot stays empty (``complete``) and nothing replaces it;
4. lower the count to the slots that still have a runnable task: Swarm's reconcile then finds as
   many running slots as the count and deletes only the empty ones; then check that no other
   task was told to stop, and report (``swarm-removed-another``) if one was.

A worker that exits 0 on its own (a SIGTERM from outside) leaves an empty slot too; the next
service update (any scale-up) refills it, and the decision core sees one replica fewer until
then. Failed tasks and tasks of a lost node are Swarm's to restart; what their workers held is
given back to the queues at once when they do not answer a ping (``scaler.restore``).

- A service is managed when its Swarm labels say ``com.docker.stack.namespace=<stack>`` and
  ``autoscale.managed=true`` (the service's ``deploy.labels``) and the policy names it, as
  ``<stack>_<name>`` (``docker stack deploy``'s naming) or exactly.
- A worker's Celery node name is confirmed by a ping (its hostname is Swarm's default, the
  container's short id, which the task reports); until confirmed it is ``<queue>@<short id>``.
- Workers' CPU and memory come from the workers themselves (the ``resource_usage`` control
  command, ``services.resource_report``): one engine's stats API sees only its own node. The
  same replies carry each node's whole-machine CPU and memory, so the host guard reads every
  node that runs a worker (``host_resources``), not the manager alone.
- No warm pool on Swarm (a task cannot be started consuming nothing and promoted later without
  a per-task environment): ``warm()`` is 0 and a policy's ``warm`` is reported, not applied.
- Reads share one task listing per cycle (``begin_cycle``); actions list afresh. Engine errors
  are retried with backoff, then raised as BackendError (the loop holds) and shown in health().
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from celery import Celery
from docker.types import ServiceMode

from scaler.backends.base import (
    BackendError,
    BackendEvent,
    BackendHealth,
    ScaleResult,
    WorkerInfo,
)
from scaler.backends.engine import ClientFactory, Engine, default_client_factory
from scaler.backends.listing import CycleListing
from scaler.backends.stranded import restore_stranded
from scaler.backends.warm_pool import set_consumers
from scaler.backends.worker_queries import ask_busy, names_by_host
from scaler.fencing import UNFENCED, Fence, LeadershipLost
from scaler.observations import Resources
from scaler.restore import UnackedRestorer, restore_dead_workers
from scaler.signals.worker_resources import WorkerResources

log = logging.getLogger(__name__)

STACK_LABEL = "com.docker.stack.namespace"
MANAGED_LABEL = "autoscale.managed"
RUNNABLE = frozenset({"ready", "running"})  # desired states of a slot Swarm keeps filled
ENDED = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})


@dataclass(frozen=True)
class SwarmTask:
    """One task of a worker service, as the manager reports it."""

    id: str
    slot: int
    node_id: str
    desired: str
    state: str
    container_id: str
    exit_code: int | None
    message: str

    @classmethod
    def from_api(cls, row: dict[str, Any]) -> SwarmTask:
        status = row.get("Status") or {}
        container = status.get("ContainerStatus") or {}
        code = container.get("ExitCode")
        return cls(
            id=str(row.get("ID", "")),
            slot=int(row.get("Slot") or 0),
            node_id=str(row.get("NodeID") or ""),
            desired=str(row.get("DesiredState") or ""),
            state=str(status.get("State") or ""),
            container_id=str(container.get("ContainerID") or ""),
            exit_code=int(code) if isinstance(code, int) else None,
            message=str(status.get("Err") or status.get("Message") or ""),
        )

    @property
    def runnable(self) -> bool:
        """Swarm means this task to run (its slot counts towards the service's count)."""
        return self.desired in RUNNABLE

    @property
    def live(self) -> bool:
        """Meant to run and not ended: a replica (starting ones included)."""
        return self.runnable and self.state not in ENDED

    @property
    def host(self) -> str:
        """The container's hostname under Swarm's default: its short id ("" before it exists)."""
        return self.container_id[:12]


@dataclass(frozen=True)
class SwarmService:
    """A managed service: its Swarm id and name, spec version and replica count, and tasks."""

    id: str
    name: str
    version: int
    replicas: int
    tasks: tuple[SwarmTask, ...]


def own_stack(client_factory: ClientFactory | None = None) -> str:
    """The stack this process's container belongs to (its ``com.docker.stack.namespace``)."""
    client = (client_factory or default_client_factory())()
    try:
        labels = client.containers.get(socket.gethostname()).labels or {}
    finally:
        client.close()
    stack = labels.get(STACK_LABEL)
    if not stack:
        raise ValueError(f"container {socket.gethostname()} has no {STACK_LABEL} label")
    return str(stack)


class SwarmBackend(CycleListing[dict[str, SwarmService]]):
    """Scales the managed worker services of one Swarm stack (see the module docstring)."""

    name = "swarm"

    def __init__(
        self,
        stack: str,
        app: Celery,
        *,
        client_factory: ClientFactory | None = None,
        drain_timeout_s: float = 3600.0,
        exit_timeout_s: float = 180.0,
        inspect_timeout_s: float = 1.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        poll_s: float = 0.3,
        resources: WorkerResources | None = None,
        restorer: UnackedRestorer | None = None,
    ) -> None:
        if not stack:
            raise ValueError("stack='': expected the name the stack was deployed under")
        for field, value in (
            ("drain_timeout_s", drain_timeout_s),
            ("exit_timeout_s", exit_timeout_s),
            ("inspect_timeout_s", inspect_timeout_s),
            ("poll_s", poll_s),
        ):
            if value <= 0:
                raise ValueError(f"{field}={value!r}: expected a positive number of seconds")
        self.stack = stack
        self.app = app
        self._factory = client_factory or default_client_factory()
        self._engine = Engine(self._factory, attempts=attempts, backoff_s=backoff_s)
        self._drain_timeout_s = drain_timeout_s
        self._exit_timeout_s = exit_timeout_s
        self._timeout_s = inspect_timeout_s
        self._poll_s = poll_s
        super().__init__()
        self._count_lock = threading.Lock()  # one count change at a time (version checks)
        self._draining: dict[str, str] = {}  # task id -> service
        self._drained: set[str] = set()  # task ids that exited after our drain
        self._events: list[BackendEvent] = []
        self._nodes: dict[str, str] = {}  # container host (short id) -> Celery node name
        self._seen_live: dict[str, tuple[str, str]] = {}  # task id -> (service, host) seen live
        self._warm_noted: set[str] = set()
        self.resources_reader = resources or WorkerResources(app, timeout_s=inspect_timeout_s)
        self.restorer = restorer
        self._node_names: dict[str, str] = {}  # Swarm node id -> hostname
        self._node_down: set[str] = set()  # Swarm node ids not "ready" at the last listing

    # -- the Backend interface ---------------------------------------------------------------

    def workers(self, service: str) -> list[WorkerInfo]:
        view = self._view(service)
        draining = self._draining_ids()
        out = []
        for task in view.tasks:
            if task.id in draining:
                state = "draining"
            elif task.live:
                state = "running"
            elif task.state in ("failed", "rejected", "orphaned"):
                state = "dead"
            else:
                continue  # ended on purpose (drained, removed by a count change): history
            out.append(WorkerInfo(service, self._node_of(service, task), task.id, state))
        return out

    def replicas(self, service: str) -> int:
        """Live tasks (starting ones included) not draining; BackendError when unreadable."""
        draining = self._draining_ids()
        return sum(1 for t in self._view(service).tasks if t.live and t.id not in draining)

    def warm(self, service: str) -> int:
        self._check_managed(service)
        return 0

    def scale(
        self, service: str, replicas: int, fence: Fence = UNFENCED, warm: int | None = None
    ) -> ScaleResult:
        if replicas < 0:
            raise ValueError(f"replicas={replicas!r} for service {service!r}: expected >= 0")
        self._check_managed(service)
        if warm and service not in self._warm_noted:
            self._warm_noted.add(service)
            self._note(service, "warm-unsupported", f"warm={warm}: no warm pool on Swarm")
        try:
            view = self._list()[service]  # never act on the cycle's shared listing
            draining = self._draining_ids()
            serving = [t for t in view.tasks if t.live and t.id not in draining]
            before = len(serving)
            if replicas > before:
                # Slots still draining keep their place until their worker exits.
                holding = sum(1 for t in view.tasks if t.runnable and t.id in draining)
                keep = {t.id for t in serving if t.node_id not in self._node_down}
                self._set_count(service, replicas + holding, fence)
                threading.Thread(target=self._stopped_others, name=f"check-{service}",
                                 args=(service, keep, "raising the count"), daemon=True,
                                 ).start()  # fmt: skip
                added = tuple(f"{view.name}+{i + 1}" for i in range(replicas - before))
                return ScaleResult(service, before, replicas, started=added)
            if replicas < before:
                chosen = self._scale_down(service, serving, before - replicas, fence)
                return ScaleResult(service, before, before - len(chosen), draining=chosen)
            return ScaleResult(service, before, before)
        finally:
            self._invalidate()

    def reconcile(self, fence: Fence = UNFENCED) -> list[BackendEvent]:
        """Report ended tasks and give back what their workers held, name new workers, read the
        workers' resources, and (after ``manage``) give stranded workers their queues back."""
        listing = self._list()
        self._read_nodes()
        events: list[BackendEvent] = []
        live_hosts: dict[str, str] = {}  # host -> service
        for service, view in listing.items():
            for task in view.tasks:
                if task.live and task.host:
                    live_hosts[task.host] = service
                    self._seen_live[task.id] = (service, task.host)
            events += self._ended(service, view)
        listed = {t.id for v in listing.values() for t in v.tasks}
        for gone in set(self._seen_live) - listed:  # deleted by Swarm (a count change): history
            del self._seen_live[gone]
        self._name(list(live_hosts))
        machines = self._node_names
        self.resources_reader.refresh(
            {
                self._nodes[t.host]: machines.get(t.node_id, t.node_id[:12])
                for v in listing.values()
                for t in v.tasks
                if t.live and t.host in self._nodes
            }
        )
        events += self._adopt(listing, live_hosts, fence)
        with self._lock:
            events, self._events = [*self._events, *events], []
        return events

    def resources(self, service: str) -> Resources:
        """Mean of the latest reports of the service's live workers (no call here)."""
        hosts = [t.host for t in self._view(service).tasks if t.live and t.host]
        return self.resources_reader.mean(self._nodes[h] for h in hosts if h in self._nodes)

    def host_resources(self) -> Resources | None:
        """The host guard's view on Swarm: the node with the most room among those running a
        worker (Swarm places a new task on any eligible node; reservations keep it off full
        ones). None before any worker reported."""
        return self.resources_reader.roomiest_node()

    def health(self) -> BackendHealth:
        extra: dict[str, object] = {"stack": self.stack, "draining": len(self._draining_ids())}
        nodes = self.resources_reader.nodes()
        if nodes:
            extra["nodes"] = nodes
        try:
            info = self._engine.call("read the engine's swarm state", lambda c: c.info())
        except BackendError as exc:
            return BackendHealth(False, str(exc), extra)
        swarm = info.get("Swarm") or {}
        if not swarm.get("ControlAvailable"):
            state = swarm.get("LocalNodeState") or "inactive"
            return BackendHealth(
                False, f"this engine is not a swarm manager (swarm state {state!r})", extra
            )
        if self._engine.last_error:
            extra["last_error"] = self._engine.last_error
        return BackendHealth(True, "", extra)

    def close(self) -> None:
        """Drop the client; workers and drains are left running."""
        self._engine.close()

    # -- reading the manager -------------------------------------------------------------------

    def _list(self) -> dict[str, SwarmService]:
        """Every managed service with its tasks; shared by the cycle's reads when in a cycle."""
        with self._lock:
            generation = self._generation
        filters = {"label": [f"{STACK_LABEL}={self.stack}", f"{MANAGED_LABEL}=true"]}
        try:
            rows = self._engine.call(
                "list services", lambda c: c.api.services(filters=filters, status=False)
            )
            by_name = {str(r["Spec"]["Name"]): r for r in rows}
            listing: dict[str, SwarmService] = {}
            for name in self._specs:
                row = by_name.get(f"{self.stack}_{name}") or by_name.get(name)
                if row is None:
                    raise BackendError(
                        f"service {name!r}: no service {self.stack}_{name} in stack "
                        f"{self.stack!r} labelled {MANAGED_LABEL}=true (found: {sorted(by_name)})"
                    )
                listing[name] = self._read_service(row)
        except BackendError as exc:
            self._share(generation, exc)
            raise
        self._share(generation, listing)
        return listing

    def _read_service(self, row: dict[str, Any]) -> SwarmService:
        mode = (row.get("Spec") or {}).get("Mode") or {}
        if "Replicated" not in mode:
            raise BackendError(f"service {row['Spec']['Name']}: not replicated (mode {mode})")
        service_id = str(row["ID"])
        tasks = self._engine.call(
            f"list tasks of {row['Spec']['Name']}",
            lambda c: c.api.tasks(filters={"service": service_id}),
        )
        return SwarmService(
            id=service_id,
            name=str(row["Spec"]["Name"]),
            version=int((row.get("Version") or {}).get("Index", 0)),
            replicas=int(mode["Replicated"].get("Replicas") or 0),
            tasks=tuple(sorted((SwarmTask.from_api(t) for t in tasks), key=lambda t: t.slot)),
        )

    def _view(self, service: str) -> SwarmService:
        self._check_managed(service)
        shared = self._shared()
        listing = shared if shared is not None else self._list()
        return listing[service]

    def _draining_ids(self) -> set[str]:
        with self._lock:
            return set(self._draining)

    def _name(self, hosts: list[str]) -> None:
        """Confirm the Celery node names of workers not yet named (one ping)."""
        unknown = [h for h in hosts if h not in self._nodes]
        if unknown:
            self._nodes.update(names_by_host(self.app, unknown, timeout_s=self._timeout_s))

    def _node_of(self, service: str, task: SwarmTask) -> str:
        """The task's worker's node name: confirmed, else the start script's ``queue@host``."""
        if task.host in self._nodes:
            return self._nodes[task.host]
        queues = self._specs[service].queues
        return f"{queues[0]}@{task.host}" if len(queues) == 1 and task.host else task.id

    def _read_nodes(self) -> None:
        """The swarm's nodes: hostname and state ("ready", "down"...) by node id. Kept from the
        last good listing when the manager cannot list them now."""
        try:
            rows = self._engine.call("list swarm nodes", lambda c: c.api.nodes())
        except BackendError as exc:
            log.warning("swarm nodes unread: %s", exc)
            return
        self._node_names = {
            str(r["ID"]): str((r.get("Description") or {}).get("Hostname") or r["ID"][:12])
            for r in rows
        }
        self._node_down = {
            str(r["ID"]) for r in rows if (r.get("Status") or {}).get("State") != "ready"
        }

    # -- changing the count ----------------------------------------------------------------------

    def _set_count(self, service: str, count: int, fence: Fence) -> tuple[int, int]:
        """Set the service's replica count from a fresh read; (count before, count after)."""
        with self._count_lock:
            view = self._list()[service]
            self._update(view, count, fence)
            return view.replicas, count

    def _update(self, view: SwarmService, count: int, fence: Fence) -> None:
        """One service update to ``count`` at the version read: a concurrent change is a
        conflict (raised), never overwritten. An update to the same count still makes Swarm
        reconcile, which refills a slot a worker left by exiting 0 on its own."""

        def update(client: docker.DockerClient) -> Any:
            return client.api.update_service(
                view.id,
                view.version,
                mode=ServiceMode("replicated", replicas=count),
                fetch_current_spec=True,
            )

        self._engine.call(f"set {view.name} to {count} replicas", update, fence)

    # -- scaling down: drain idle workers, let them exit, then lower the count -------------------

    def _scale_down(
        self, service: str, serving: list[SwarmTask], count: int, fence: Fence
    ) -> tuple[str, ...]:
        self._name([t.host for t in serving if t.host])
        named = {t.id: self._node_of(service, t) for t in serving}
        engine = self._engine
        busy = ask_busy(self.app, list(named.values()), timeout_s=self._timeout_s,
                        attempts=engine.attempts, backoff_s=engine.backoff_s)  # fmt: skip
        idle = [t for t in serving if busy.get(named[t.id]) is False]
        per_node: dict[str, int] = {}
        for t in serving:
            per_node[t.node_id] = per_node.get(t.node_id, 0) + 1
        # The most crowded node first (the balance Swarm keeps), then the highest slot.
        idle.sort(key=lambda t: (per_node[t.node_id], t.slot), reverse=True)
        chosen = idle[:count]
        if len(chosen) < count:
            kept = [f"{named[t.id]}={'busy' if busy.get(named[t.id]) else 'no answer'}"
                    for t in serving if t not in chosen]  # fmt: skip
            held = f"wanted to stop {count}, only {len(chosen)} idle; kept: {', '.join(kept)}"
            self._note(service, "scale-down-held", held)
        for task in chosen:
            with self._lock:
                self._draining[task.id] = service
            threading.Thread(
                target=self._drain, args=(service, task, named[task.id], fence),
                name=f"drain-{named[task.id]}", daemon=True,
            ).start()  # fmt: skip
        return tuple(named[t.id] for t in chosen)

    def _drain(self, service: str, task: SwarmTask, node: str, fence: Fence) -> None:
        """Cancel, wait idle, shut down, wait for the exit, lower the count (module docstring)."""
        cancelled = False
        try:
            queues = self._specs[service].queues
            failed = set_consumers(self.app, node, queues, add=False, fence=fence,
                                   timeout_s=self._timeout_s * 5)  # fmt: skip
            cancelled = True
            if failed:
                self._note(service, "drain-aborted", f"{node}: {failed}")
                return
            deadline = time.monotonic() + self._drain_timeout_s
            while True:
                fence.check(f"drain {node}")
                try:
                    busy = ask_busy(self.app, [node], timeout_s=self._timeout_s)[node]
                except BackendError:
                    busy = None
                if busy is False:
                    break
                if time.monotonic() > deadline:
                    self._note(service, "drain-timeout", f"{node} not idle: left running, "
                               "its queues given back at the next adoption check")  # fmt: skip
                    return
                time.sleep(self._poll_s)
            fence.check(f"shut down {node}")
            self.app.control.shutdown(destination=[node])
            ended = self._wait_ended(service, task.id)
            if ended is None:
                waited = f"{self._exit_timeout_s:.0f} s"
                self._note(service, "drain-exit-timeout", f"{node} (task {task.id[:12]}) still "
                           f"running {waited} after the shutdown request")  # fmt: skip
                return
            with self._lock:
                self._drained.add(task.id)
            restored = restore_dead_workers(self.restorer, service, [node], "drained, exited")
            if restored is not None:
                self._note(service, restored.kind, restored.detail)
            if ended.state != "complete":
                self._note(service, "drain-exit-failed",
                           f"{node} ended {ended.state} (exit code {ended.exit_code}): Swarm "
                           "restarts it; the count stays")  # fmt: skip
                return
            self._note(service, "drained", f"{node} (task {task.id[:12]}) exited 0; "
                       + self._lower_count(service, task.id, fence))  # fmt: skip
            cancelled = False
        except LeadershipLost as exc:
            self._note(service, "fenced", f"{node}: {exc}")
        except Exception as exc:
            self._note(service, "drain-error", f"{node}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._draining.pop(task.id, None)
                if cancelled:  # it may consume nothing now: the next reconcile checks
                    self._adopt_pending = True
            self._invalidate()

    def _wait_ended(self, service: str, task_id: str) -> SwarmTask | None:
        """The task once it has ended, polled until ``exit_timeout_s``; None if it did not."""
        deadline = time.monotonic() + self._exit_timeout_s
        while time.monotonic() < deadline:
            task = next((t for t in self._list()[service].tasks if t.id == task_id), None)
            if task is None or task.state in ENDED:
                return task or SwarmTask(task_id, 0, "", "shutdown", "complete", "", 0, "gone")
            time.sleep(self._poll_s)
        return None

    def _lower_count(self, service: str, drained: str, fence: Fence) -> str:
        """Set the count to the slots that still have a runnable task, then check that Swarm
        told no other task to stop; the outcome in words."""
        deadline = time.monotonic() + 5.0
        with self._count_lock:
            while True:  # Swarm marks an exited task not runnable at its orchestrator's next tick
                view = self._list()[service]
                gone = all(not t.runnable for t in view.tasks if t.id == drained)
                if gone or time.monotonic() > deadline:
                    break
                time.sleep(self._poll_s)
            self._read_nodes()  # a lost node's tasks are Swarm's to replace, not ours to keep
            keep = {t.id for t in view.tasks if t.runnable and t.state not in ENDED
                    and t.node_id not in self._node_down}  # fmt: skip
            count = len({t.slot for t in view.tasks if t.runnable})
            if count >= view.replicas:
                return f"count stays {view.replicas} (slot already refilled or counted)"
            self._update(view, count, fence)
        stopped = self._stopped_others(service, keep, f"lowering the count after {drained[:12]}")
        if stopped:
            return f"count {view.replicas} -> {count}; Swarm ALSO stopped {len(stopped)} other(s)"
        return f"count {view.replicas} -> {count}; no other task stopped"

    def _stopped_others(self, service: str, keep: set[str], why: str) -> set[str]:
        """Tasks of ``keep`` (live before a count change) that Swarm told to stop within a few
        seconds after it, not counting our own drains; reported as ``swarm-removed-another``.

        A count change should stop nothing: Swarm stops a running task either because the
        count went below the running slots (never, by construction) or because the update
        changed the task spec (a rolling update: e.g. a service created without resources,
        whose spec reads back with empty ones). Tasks of a lost node are not in ``keep``: Swarm
        removes those first on a lower count, and their workers are gone already."""
        stopped: set[str] = set()
        deadline = time.monotonic() + 5.0  # the orchestrator acts within its next tick
        while time.monotonic() < deadline:
            now = {t.id: t for t in self._list()[service].tasks}
            with self._lock:  # our other drains' workers exit (and go) meanwhile: not Swarm's
                ours = set(self._draining) | self._drained
            # Swarm deletes the tasks it removes on a count change, and shuts down those a
            # rolling update replaces; one that exited 0 by itself meanwhile is "complete".
            stopped = {
                tid for tid in keep - ours
                if tid not in now or (not now[tid].runnable and now[tid].state != "complete")
            }  # fmt: skip
            if stopped:
                break
            time.sleep(self._poll_s)
        if stopped:
            names = ", ".join(sorted(t[:12] for t in stopped))
            self._note(service, "swarm-removed-another", f"{why}, Swarm also stopped {names}")
        return stopped

    # -- tasks that ended without us -----------------------------------------------------------

    def _ended(self, service: str, view: SwarmService) -> list[BackendEvent]:
        """Tasks we saw live that Swarm has stopped or lost (not drained by us): reported once,
        and their workers' messages given back when they do not answer a ping."""
        events: list[BackendEvent] = []
        with self._lock:
            ours = set(self._draining) | self._drained
        gone: list[tuple[SwarmTask, str]] = []
        for task in view.tasks:
            seen = self._seen_live.get(task.id)
            if seen is None or task.live or task.id in ours:
                continue
            if task.state not in ENDED and task.node_id not in self._node_down:
                continue  # told to stop, still stopping (a warm shutdown): not dead yet
            del self._seen_live[task.id]
            gone.append((task, self._nodes.get(seen[1], f"?@{seen[1]}")))
            events.append(BackendEvent(service, "task-ended",
                          f"task {task.id[:12]} slot {task.slot}: desired {task.desired}, "
                          f"state {task.state} ({task.message or 'no message'})"))  # fmt: skip
        known = [node for _, node in gone if not node.startswith("?@")]
        if known and self.restorer is not None:
            dead = [n for n in known if n not in self.restorer.answering(known)]
            event = restore_dead_workers(self.restorer, service, dead, "task ended, no ping")
            if event is not None:
                events.append(event)
        ids = {t.id for t in view.tasks}
        with self._lock:
            self._drained &= ids
        return events

    def _adopt(
        self, listing: dict[str, SwarmService], live_hosts: dict[str, str], fence: Fence
    ) -> list[BackendEvent]:
        """After ``manage`` (a start, a takeover) or a drain cut short: live workers consuming
        none of their queues get them back (scaler.backends.stranded)."""
        with self._lock:
            pending, draining = self._adopt_pending, set(self._draining)
        if not pending:
            return []
        busy_hosts = {t.host for v in listing.values() for t in v.tasks if t.id in draining}
        wanted = {
            self._nodes[h]: self._specs[s].queues
            for h, s in live_hosts.items()
            if h in self._nodes and h not in busy_hosts
        }
        try:
            fence.check("give stranded workers their queues back")
            restores = restore_stranded(self.app, wanted, self._timeout_s)
        except LeadershipLost as exc:
            return [BackendEvent("*", "fenced", f"adoption check: {exc}")]
        except Exception as exc:
            return [BackendEvent("*", "adopt-failed", f"{type(exc).__name__}: {exc}")]
        with self._lock:
            self._adopt_pending = False
        service_of = {self._nodes[h]: s for h, s in live_hosts.items() if h in self._nodes}
        return [
            BackendEvent(service_of.get(r.node, "*"), "stranded-restored" if r.confirmed
                         else "stranded-restore-failed", r.detail)
            for r in restores
        ]  # fmt: skip

    def _note(self, service: str, kind: str, detail: str) -> None:
        log.info("%s %s: %s", service, kind, detail)
        with self._lock:
            self._events.append(BackendEvent(service, kind, detail))
