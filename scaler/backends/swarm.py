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
4. lower the count by the released slots, and only when Swarm would remove exactly those
   (``release_plan``): Swarm still counts a slot whose task exited 0 and will not restart
   (swarmkit's ``IsTaskUpdatable``), so a lower count makes it pick the slots to remove by node
   balance, a released one among them only when it sorts last (moby/moby#37383). With a node
   lost, a replacement with no node yet sorts last of all; so the count waits until every other
   slot runs on a ready node and no released slot is numbered below a running one, and each
   reconcile tries again (``released``). Then check that no other task was told to stop, and
   report (``swarm-removed-another``) if one was.

A worker that exits 0 on its own (a SIGTERM from outside) leaves a released slot too: Swarm
never refills it, a scale-up counts it on top of the replicas asked for, and a reconcile
releases it as above; the decision core sees one replica fewer meanwhile. Failed tasks and
tasks of a lost node are Swarm's to restart; what their workers held is given back to the
queues at once when they do not answer a ping (``scaler.restore``).

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
- The engine is the engine gate's (DOCKER_HOST=tcp://gate:2375 and its token, docs/gate.md):
  services, tasks and nodes are read as from the engine's API, and a count is changed only
  with the gate's scale operation (scaler.backends.swarm_gate), never with a spec of our own.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import docker
from celery import Celery

from scaler.backends.base import (
    BackendError,
    BackendEvent,
    BackendHealth,
    ScaleResult,
    WorkerInfo,
)
from scaler.backends.engine import ClientFactory, Engine, default_client_factory
from scaler.backends.listing import CycleListing
from scaler.backends.stranded import ConsumerCheck
from scaler.backends.swarm_gate import StaleVersion, gate_stack, scale_service
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
# Desired states up to "running" (swarmkit's TaskState order): such a task keeps its slot counted.
UP_TO_RUNNING = frozenset(
    {"new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running"}
)


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
    condition: str = "any"  # its spec's restart condition (Swarm's default: any)
    max_attempts: int = 0

    @classmethod
    def from_api(cls, row: dict[str, Any]) -> SwarmTask:
        status = row.get("Status") or {}
        container = status.get("ContainerStatus") or {}
        code = container.get("ExitCode")
        restart = (row.get("Spec") or {}).get("RestartPolicy")
        return cls(
            id=str(row.get("ID", "")),
            slot=int(row.get("Slot") or 0),
            node_id=str(row.get("NodeID") or ""),
            desired=str(row.get("DesiredState") or ""),
            state=str(status.get("State") or ""),
            container_id=str(container.get("ContainerID") or ""),
            exit_code=int(code) if isinstance(code, int) else None,
            message=str(status.get("Err") or status.get("Message") or ""),
            condition="any" if restart is None else str(restart.get("Condition") or ""),
            max_attempts=int((restart or {}).get("MaxAttempts") or 0),
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

    @property
    def restarts(self) -> bool | None:
        """swarmkit's ``ShouldRestart`` for this task as it is (manager/orchestrator/restart):
        None when the answer hangs on a restart history the API does not show (max_attempts)
        or on a condition unknown here."""
        if self.condition == "none":
            return False
        if self.condition == "on-failure" and self.state == "complete":
            return False
        if self.condition not in ("any", "on-failure"):
            return None
        return True if self.max_attempts == 0 else None

    @property
    def counted(self) -> bool | None:
        """Whether Swarm's replicated orchestrator counts this task's slot towards the service's
        replicas (swarmkit's ``IsTaskUpdatable``): a task meant to run, or one that stopped and
        will not be restarted (a drained worker's, which exited 0 under ``on-failure``)."""
        if self.desired in UP_TO_RUNNING:
            return True
        restarts = self.restarts
        return None if restarts is None else not restarts


def _exited(task: SwarmTask, nodes_down: set[str]) -> bool:
    """The task's node reported its container ended (not a task of a lost node, whose container
    nobody can see: it may still run)."""
    return task.state in ENDED - {"orphaned", "remove"} and task.node_id not in nodes_down


@dataclass(frozen=True)
class SwarmService:
    """A managed service: its Swarm id and name, spec version and replica count, and tasks."""

    id: str
    name: str
    version: int
    replicas: int
    tasks: tuple[SwarmTask, ...]
    update_state: str = ""  # UpdateStatus.State: "updating" while a rolling update runs


# swarmkit sorts the slots to remove with Go's sort.Sort, which keeps equal slots in their order
# (insertion sort) up to 12 slots since Go 1.19 and up to 6 before; past that, ties are arbitrary.
STABLE_TIES_GO_1_19 = 12
STABLE_TIES_BEFORE = 6


@dataclass(frozen=True)
class ReleasePlan:
    """A count change that makes Swarm remove exactly the released slots, and nothing else."""

    released: tuple[int, ...]  # slot numbers whose tasks all ended for good
    count: int  # the replicas to set: the current count less the released slots


def counted_slots(view: SwarmService) -> dict[int, list[SwarmTask]] | str:
    """The slots Swarm's orchestrator counts, with their counted tasks (swarmkit's
    ``updatableAndDeadSlots``); a reason instead when that cannot be told from the API."""
    slots: dict[int, list[SwarmTask]] = {}
    for task in view.tasks:
        counted = task.counted
        if counted is None:
            return (f"task {task.id[:12]}: restart condition {task.condition!r}, max_attempts "
                    f"{task.max_attempts}: whether Swarm counts its slot is unknown")  # fmt: skip
        if counted:
            slots.setdefault(task.slot, []).append(task)
    return slots


def released_slots(slots: dict[int, list[SwarmTask]]) -> list[int]:
    """Counted slots whose tasks all ended and none will be restarted: no worker runs there or
    will, yet Swarm counts them (it never refills them) until the count drops by them."""
    return sorted(
        slot
        for slot, tasks in slots.items()
        if all(t.state in ENDED and t.restarts is False for t in tasks)
    )


def release_plan(
    view: SwarmService, down: set[str], stable_ties: int = STABLE_TIES_BEFORE
) -> ReleasePlan | str:
    """The count that makes Swarm remove the released slots and only them; else why not now.

    Asked for fewer replicas than the slots it counts, swarmkit's replicated orchestrator
    (manager/orchestrator/replicated/services.go, ``reconcile``) sorts the counted slots (running
    ones first), numbers each slot on its node 1, 2, 3... in that order (-1 for a slot of several
    tasks or with no node yet), sorts by that number (-1 last) and removes the tail. A released
    slot counts too (its task exited 0 and will not restart), so lowering the count by the
    released slots removes exactly them only when they make that tail whatever the order of
    equals: every other counted slot one settled task (running on a ready node: numbered before
    any ended slot of its node, never -1), and no released slot numbered below a running one
    (equal numbers keep running first while Go's sort keeps ties in order, ``stable_ties``).
    Swarm must count as many slots as the spec's replicas (no reconcile pending), and no rolling
    update or rollback may be running (it changes what counts)."""
    if view.update_state in ("updating", "rollback_started"):
        return f"a rolling update is {view.update_state}"
    slots = counted_slots(view)
    if isinstance(slots, str):
        return slots
    if len(slots) != view.replicas:
        return f"Swarm counts {len(slots)} slots for {view.replicas} replicas (not reconciled yet)"
    released = released_slots(slots)
    if not released:
        return "no released slot"
    per_node: dict[str, int] = {}
    for slot, tasks in slots.items():
        if slot in released:
            continue
        task = tasks[0]
        if len(tasks) > 1 or task.desired != "running" or task.state != "running":
            states = ", ".join(f"{t.id[:12]} {t.desired}/{t.state}" for t in tasks)
            return f"slot {slot} not settled ({states})"
        if not task.node_id or task.node_id in down:
            return f"slot {slot}: task {task.id[:12]} is on a node that is down"
        per_node[task.node_id] = per_node.get(task.node_id, 0) + 1
    top = max(per_node.values(), default=0)
    lowest = min(
        per_node.get(slots[s][0].node_id, 0) + 1
        if len(slots[s]) == 1 and slots[s][0].node_id
        else top + 1  # numbered -1: sorted last, removed first
        for s in released
    )
    if lowest < top or (lowest == top and len(slots) > stable_ties):
        return (f"Swarm would remove a running slot first (a released slot numbered {lowest} on "
                f"its node, a running one {top}: node balance comes before state)")  # fmt: skip
    return ReleasePlan(tuple(released), view.replicas - len(released))


def own_stack(client_factory: ClientFactory | None = None) -> str:
    """The stack this scaler serves when none is given: the one the engine gate serves (its
    GATE_STACK, read from ``GET /gate/v1/status``). The scaler's own task is not a managed one,
    so the gate does not show its labels. ValueError when the gate cannot say (pass the stack:
    ``--stack`` or SCALER_SWARM_STACK)."""
    return gate_stack(client_factory)


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
        self._ties: int | None = None  # slots swarmkit's sort keeps in order (_stable_ties)
        self._consumers = ConsumerCheck(app, inspect_timeout_s)  # heals only: Swarm replaces

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
            node = self._node_of(service, task)
            out.append(WorkerInfo(service, node, task.id, state, host=task.host))
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
                # Released slots (a drained worker's, not released yet) count too: Swarm never
                # refills them, so without them the count would start fewer than asked.
                slots = counted_slots(view)
                ghosts = 0 if isinstance(slots, str) else len(released_slots(slots))
                keep = {t.id: t.node_id for t in serving if t.node_id not in self._node_down}
                self._set_count(service, replicas + holding + ghosts, fence)
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
        workers' resources, and give workers consuming none of their queues those back."""
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
        self._release_later(listing, fence)
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
            update_state=str((row.get("UpdateStatus") or {}).get("State") or ""),
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
        """One count change to ``count`` at the version read: a concurrent change is a conflict
        (raised: the next cycle reads again), never overwritten. Swarm does not refill a slot a
        worker left by exiting 0 (it still counts it): scale() adds such slots to the count it
        asks for.

        Through the engine gate's scale operation (scaler.backends.swarm_gate): the gate reads
        the spec as stored (no ``insertDefaults``) and posts it back with only
        ``Mode.Replicated.Replicas`` changed, at the listing's version; the scaler sends no spec.
        Whatever the deploying CLI sent or left out stays as it was, so the task template is
        unchanged and Swarm replaces no running task (issue 24: a spec read with the engine's
        defaults gained ``DNSConfig: {}`` and Swarm rolled every running task)."""

        def update(client: docker.DockerClient) -> Any:
            try:
                return scale_service(client, view.id, count, view.version)
            except StaleVersion as exc:
                raise BackendError(
                    f"set {view.name} to {count} replicas: the service changed since it was "
                    f"read (version {view.version}; {exc}); the next cycle reads again"
                ) from None

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
        # One at a time from the node with the most workers left, then the highest slot: the
        # slots Swarm removes first when the count drops (release_plan), so theirs can go.
        chosen: list[SwarmTask] = []
        while idle and len(chosen) < count:
            best = max(idle, key=lambda t: (per_node[t.node_id], t.slot))
            idle.remove(best)
            chosen.append(best)
            per_node[best.node_id] -= 1
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
        """Lower the count by the released slots when Swarm would remove exactly those
        (``release_plan``), then check that it told no other task to stop; else leave the count
        for a later reconcile. The outcome in words."""
        deadline = time.monotonic() + 5.0
        with self._count_lock:
            while True:  # Swarm marks an exited task not runnable at its orchestrator's next tick
                view = self._list()[service]
                gone = all(not t.runnable for t in view.tasks if t.id == drained)
                if gone or time.monotonic() > deadline:
                    break
                time.sleep(self._poll_s)
            outcome, keep = self._release(service, fence)
        if keep is None:
            return f"{outcome}; retried at each reconcile"
        return self._check_release(service, keep, outcome, f"lowering the count after "
                                   f"{drained[:12]}")  # fmt: skip

    def _release(self, service: str, fence: Fence) -> tuple[str, dict[str, str] | None]:
        """With the count lock held, from a fresh read: lower the count by the released slots if
        ``release_plan`` allows it now. The outcome in words, and the live tasks to check
        afterwards (None when the count stayed)."""
        self._read_nodes()  # a lost node's tasks are Swarm's to replace, not ours to keep
        view = self._list()[service]
        plan = release_plan(view, self._node_down, self._stable_ties())
        if isinstance(plan, str):
            return f"count stays {view.replicas} ({plan})", None
        keep = {t.id: t.node_id for t in view.tasks if t.live and t.node_id not in self._node_down}
        self._update(view, plan.count, fence)
        slots = ", ".join(str(s) for s in plan.released)
        return f"count {view.replicas} -> {plan.count} (released slot {slots})", keep

    def _check_release(self, service: str, keep: dict[str, str], outcome: str, why: str) -> str:
        stopped = self._stopped_others(service, keep, why)
        if stopped:
            return f"{outcome}; Swarm ALSO stopped {len(stopped)} other(s)"
        return f"{outcome}; no other task stopped"

    def _release_later(self, listing: dict[str, SwarmService], fence: Fence) -> None:
        """At reconcile: release the slots a drain had to leave counted (``release_plan`` said
        not then) or a worker left by exiting 0 on its own, once the plan allows it. Skipped
        while a drain holds the count lock or runs for the service (it releases its own slot and
        reports it); the check runs in a thread of its own."""
        with self._lock:
            draining = set(self._draining.values())
        for service, view in listing.items():
            if service in draining:
                continue
            if isinstance(release_plan(view, self._node_down, self._stable_ties()), str):
                continue
            if not self._count_lock.acquire(blocking=False):
                return
            try:
                outcome, keep = self._release(service, fence)
            except Exception as exc:  # the next reconcile tries again
                self._note(service, "release-failed", f"{type(exc).__name__}: {exc}")
                continue
            finally:
                self._count_lock.release()
            if keep is not None:
                threading.Thread(target=self._released, args=(service, keep, outcome),
                                 name=f"release-{service}", daemon=True).start()  # fmt: skip

    def _released(self, service: str, keep: dict[str, str], outcome: str) -> None:
        try:
            self._note(service, "released", self._check_release(service, keep, outcome,
                                                                "releasing slots"))  # fmt: skip
        except Exception as exc:  # the service went away meanwhile, the manager is unreachable
            self._note(service, "released", f"{outcome}; check failed: {exc}")

    def _stable_ties(self) -> int:
        """How many slots swarmkit's sort keeps equals in order: it depends on the Go version
        the manager's engine was built with (read once; the older bound when unread)."""
        if self._ties is None:
            try:
                info = self._engine.call("read the engine's version", lambda c: c.version())
                go = str(info.get("GoVersion") or "").removeprefix("go").split(".")
                newer = tuple(int(p) for p in go[:2]) >= (1, 19)
            except (BackendError, ValueError):
                return STABLE_TIES_BEFORE
            self._ties = STABLE_TIES_GO_1_19 if newer else STABLE_TIES_BEFORE
        return self._ties

    def _stopped_others(self, service: str, keep: dict[str, str], why: str) -> set[str]:
        """Tasks of ``keep`` (live before a count change, with their node ids) that Swarm told
        to stop within a few seconds after it, not counting our own drains; reported as
        ``swarm-removed-another``.

        A count change should stop nothing: Swarm stops a running task either because the
        count went below the running slots (never, by construction) or because the update
        changed the task spec (a rolling update, which ``_update`` never asks for: the gate
        sends back the spec as stored). Tasks of a lost node are not counted: Swarm removes
        those first on a lower count, and their workers are gone already. A node can be found
        lost only after ``keep`` was taken (Swarm marks it down after missed heartbeats, seconds
        after it died), so the nodes are read again at each poll.

        A rolling update is caught when it starts, not only when it stops the old task: with
        ``order: start-first`` Swarm first starts a new task in the old one's slot and stops the
        old one only once the new one runs (healthy: a worker's health check takes longer than
        this check waits); a runnable task of another id in a kept task's slot is that. Both
        kinds are returned (stopped and being replaced)."""
        stopped: set[str] = set()
        replaced: set[str] = set()
        deadline = time.monotonic() + 5.0  # the orchestrator acts within its next tick
        while time.monotonic() < deadline:
            now = {t.id: t for t in self._list()[service].tasks}
            self._read_nodes()
            with self._lock:  # our other drains' workers exit (and go) meanwhile: not Swarm's
                ours = set(self._draining) | self._drained
            kept = {tid for tid, node in keep.items() if node not in self._node_down}
            # Swarm deletes the tasks it removes on a count change, and shuts down those a
            # rolling update replaces; one that exited 0 by itself meanwhile is "complete".
            stopped = {
                tid for tid in kept - ours
                if tid not in now or (not now[tid].runnable and now[tid].state != "complete")
            }  # fmt: skip
            replaced = {
                tid for tid in kept - ours - stopped
                if tid in now and any(t.slot == now[tid].slot and t.id != tid and t.runnable
                                      for t in now.values())
            }  # fmt: skip
            if stopped or replaced:
                break
            time.sleep(self._poll_s)
        if stopped or replaced:
            what = []
            if stopped:
                what.append(f"stopped {', '.join(sorted(t[:12] for t in stopped))}")
            if replaced:
                what.append(f"started a replacement (a rolling update) for "
                            f"{', '.join(sorted(t[:12] for t in replaced))}")  # fmt: skip
            self._note(service, "swarm-removed-another", f"{why}, Swarm also {'; '.join(what)}")
        return stopped | replaced

    # -- tasks that ended without us -----------------------------------------------------------

    def _ended(self, service: str, view: SwarmService) -> list[BackendEvent]:
        """Tasks we saw live that Swarm has stopped or lost (not drained by us): reported once,
        and their workers' messages given back: at once when their node reported the container
        ended (by its hostname: a worker whose name was never confirmed too), and for a task of
        a lost node (nobody can say its container stopped) when its worker does not answer a
        ping."""
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
        exited = [t.host for t, _ in gone if _exited(t, self._node_down) and t.host]
        lost = [n for t, n in gone if not _exited(t, self._node_down) and not n.startswith("?@")]
        if exited and self.restorer is not None:
            event = restore_dead_workers(self.restorer, service, [], "task ended", hosts=exited)
            if event is not None:
                events.append(event)
        if lost and self.restorer is not None:
            dead = [n for n in lost if n not in self.restorer.answering(lost)]
            event = restore_dead_workers(self.restorer, service, dead, "node lost, no ping")
            if event is not None:
                events.append(event)
        ids = {t.id for t in view.tasks}
        with self._lock:
            self._drained &= ids
        return events

    def _adopt(
        self, listing: dict[str, SwarmService], live_hosts: dict[str, str], fence: Fence
    ) -> list[BackendEvent]:
        """Every reconcile, the standing consumer check (scaler.backends.stranded) over the named
        live workers not draining. Heal only: a relapse is healed again and reported
        (``consumer-less-persists``); this backend has no replacement path of its own."""
        with self._lock:
            self._adopt_pending = False
            draining = set(self._draining)
        task_of = {t.host: t.id for v in listing.values() for t in v.tasks if t.live and t.host}
        host_of = {
            self._nodes[h]: h for h in live_hosts if h in self._nodes and task_of[h] not in draining
        }

        def still_serving(node: str) -> bool:  # under the lock: a drain registers itself first
            return task_of[host_of[node]] not in self._draining

        wanted = {n: (live_hosts[h], self._specs[live_hosts[h]].queues) for n, h in host_of.items()}
        return self._consumers.run(wanted, lock=self._lock, still_serving=still_serving,
                                   fence=fence)  # fmt: skip

    def _note(self, service: str, kind: str, detail: str) -> None:
        log.info("%s %s: %s", service, kind, detail)
        with self._lock:
            self._events.append(BackendEvent(service, kind, detail))
