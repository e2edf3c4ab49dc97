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
    read_at: float = 0.0  # time.monotonic() of the reading (for staleness; never the wall clock)
    # Left out of in_flight: unacked entries older than the longest a live worker can hold a due
    # task (a killed worker's; Redis only). Shown by status, never counted as work.
    abandoned: int = 0
    # Left out of waiting: messages in the queue whose ETA is still ahead (Redis only; only the
    # scanned oldest part of each list is corrected, see scaler.signals.redis_queues).
    not_due: int = 0

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
    read_at: float = 0.0  # time.monotonic() of the reading (for staleness)


@dataclass(frozen=True)
class ServiceObservation:
    """One managed worker service: how many replicas it has and how loaded they are."""

    service: str
    replicas: int | None  # running replicas as the backend reports them; None if unreadable
    queues: Mapping[str, QueueSignal]
    workers: Resources  # mean over the service's replicas
    busy_replicas: int | None = None  # replicas running at least one task, when known
    warm: int = 0  # warm-pool replicas (booted, consuming nothing): not counted in ``replicas``


@dataclass(frozen=True)
class Observations:
    """Everything the core needs for one decision cycle."""

    at: float  # when the cycle read its signals, on the monotonic clock (as every read_at)
    services: Mapping[str, ServiceObservation]
    host: Resources
    errors: tuple[str, ...] = field(default=())  # what could not be read, in words
