"""The one small interface every backend implements, so the loop never knows which one runs.

A backend owns the replicas of the managed worker services: it lists them, counts them, scales a
service to N (starting workers, or draining and stopping the chosen ones), replaces workers that
died, and reports its own health and the workers' CPU and memory. Backends are thin adapters: no
policy and no arithmetic lives here.

Every action (``scale``, ``reconcile``) gets the :class:`~scaler.fencing.Fence` of the lease it
runs under, and checks it right before each mutating call, in the threads it starts too (drains,
replacements): an action outlives neither its leadership nor its lease generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from scaler.fencing import UNFENCED, Fence
from scaler.observations import Resources


class BackendError(RuntimeError):
    """The backend could not do or read something (engine, process table or broker trouble)."""


@dataclass(frozen=True)
class ServiceSpec:
    """What the backend needs to know about one managed service: its name and its queues."""

    name: str
    queues: tuple[str, ...]
    # A worker whose heartbeat is older than this is drained if it answers, else stopped, and
    # replaced (the policy's unresponsive_after_s); None: never.
    unresponsive_after_s: float | None = None
    # Host paths a clone of this service's container may bind-mount (the policy's
    # clone.allowed_bind_mounts); any other bind mount makes the template unsafe to clone.
    allowed_bind_mounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerInfo:
    """One worker replica as the backend sees it."""

    service: str
    name: str  # Celery node name, e.g. "io-2@host"
    ident: str  # pid, container id...
    state: str  # "running", "draining", "stopped" or "dead"
    # The hostname the worker reports after the "@" of its node name: its container's hostname
    # ("" where the backend names workers itself, as the local backend does). How an owner of
    # unacked messages is matched to its container when its node name was never confirmed.
    host: str = ""


@dataclass(frozen=True)
class ScaleResult:
    """What a scale call did: workers started, drains begun, and the count it leaves."""

    service: str
    before: int
    after: int
    started: tuple[str, ...] = ()
    draining: tuple[str, ...] = ()
    promoted: tuple[str, ...] = ()  # warm replicas that serve now (in ``started`` too)
    # booting warm replicas taken as serving: consumers added once they answer (in ``started``)
    committed: tuple[str, ...] = ()
    to_pool: tuple[str, ...] = ()  # drained replicas returning to the warm pool
    warm_started: tuple[str, ...] = ()  # replicas started for the warm pool
    warm_stopped: tuple[str, ...] = ()  # warm replicas being stopped (pool trimmed)


@dataclass(frozen=True)
class BackendEvent:
    """Something the backend did on its own (a dead worker replaced, a drain finished)."""

    service: str
    kind: str  # "replaced", "drained", "drain-timeout", "restored", ...
    detail: str
    count: int = 0  # for "restored": the messages put back on their queues


@dataclass(frozen=True)
class BackendHealth:
    """Whether the backend can act now, and if not, why."""

    ok: bool
    detail: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """The interface the loop drives."""

    name: str

    def manage(self, specs: Sequence[ServiceSpec]) -> None:
        """Set the services under management (called at start and when the policy reloads)."""

    def begin_cycle(self) -> None:
        """A new loop cycle starts: reads may share one view of the workers until the next call.

        Lets a backend whose listing is expensive (the Compose backend asks the engine) list once
        per cycle instead of once per read. Actions (scale, reconcile) always read afresh, so
        nothing is ever done on a shared view. Backends with cheap reads do nothing here.
        """

    def services(self) -> list[str]:
        """Names of the managed services."""

    def workers(self, service: str) -> list[WorkerInfo]:
        """The service's workers, draining ones included."""

    def replicas(self, service: str) -> int:
        """Replicas that count towards the service's size (running, not draining).

        Raises BackendError when the count cannot be read: the loop then holds.
        """

    def warm(self, service: str) -> int:
        """Warm-pool replicas (booted or booting, consuming nothing; returning to the pool
        too): not counted by ``replicas``. BackendError when the pool cannot be read."""

    def scale(
        self, service: str, replicas: int, fence: Fence = UNFENCED, warm: int | None = None
    ) -> ScaleResult:
        """Move the service towards ``replicas`` serving; scale-up promotes ready warm replicas
        before starting cold ones, scale-down drains before stopping and returns drained
        replicas to the pool while it is short of ``warm``; then the pool is refilled or trimmed
        to ``warm`` (None: the pool is left as it is, nothing returns to it). Raises
        :class:`~scaler.fencing.LeadershipLost` when ``fence`` refuses a step."""

    def reconcile(self, fence: Fence = UNFENCED) -> list[BackendEvent]:
        """Replace dead and unresponsive workers and finish drains; what happened, for the log
        and status. Steps ``fence`` refuses are skipped (reported as events)."""

    def resources(self, service: str) -> Resources:
        """Mean CPU and memory of the service's workers (fields None when unreadable)."""

    def health(self) -> BackendHealth:
        """Can the backend act right now?"""

    def close(self) -> None:
        """Release what the backend holds (not its workers: they outlive a scaler restart)."""
