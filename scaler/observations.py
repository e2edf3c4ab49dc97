"""What the scaler sees in one cycle: plain frozen values, no I/O.

Collectors (scaler.signals) produce these; the decision core (scaler.decide) consumes them. A
signal that could not be read is ``None`` ("missing"), never zero: the core holds rather than
scaling down on data it does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class QueueSignal:
    """One broker queue at one instant."""

    queue: str
    waiting: int | None  # messages ready in the broker (all priority sub-queues)
    in_flight: int | None  # taken by a worker but not yet acked (reserved or running)
    oldest_age_s: float | None  # age of the oldest waiting message; None when unknown
    # True when the queue is known to be empty, so oldest_age_s is None for that reason.
    read_at: float = 0.0  # wall-clock time of the reading (for staleness)

    @property
    def work(self) -> int | None:
        """Waiting plus in-flight: the tasks the service still has to finish."""
        if self.waiting is None or self.in_flight is None:
            return None
        return self.waiting + self.in_flight


@dataclass(frozen=True)
class Resources:
    """CPU and memory, in percent of what is available to the thing measured."""

    cpu_percent: float | None
    memory_percent: float | None
    read_at: float = 0.0


@dataclass(frozen=True)
class ServiceObservation:
    """One managed worker service: how many replicas it has and how loaded they are."""

    service: str
    replicas: int | None  # running replicas as the backend reports them; None if unreadable
    queues: Mapping[str, QueueSignal]
    workers: Resources  # mean over the service's replicas
    busy_replicas: int | None = None  # replicas running at least one task, when known


@dataclass(frozen=True)
class Observations:
    """Everything the core needs for one decision cycle."""

    at: float  # wall-clock time of the cycle
    services: Mapping[str, ServiceObservation]
    host: Resources
    errors: tuple[str, ...] = field(default=())  # what could not be read, in words
