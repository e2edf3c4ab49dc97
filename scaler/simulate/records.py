"""What a simulation produced: per-cycle steps, decisions, actions, tasks and replica lives.

Plain records, kept apart from the engine that fills them so that the report, the CLI and the
tests read them without the event loop.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from scaler.policy import Policy
from scaler.simulate.model import Model

__all__ = ["Action", "DecisionRecord", "ReplicaLife", "SimResult", "Step", "TaskLog"]


class Step(NamedTuple):
    """One service at one cycle, as observed before deciding, plus what was decided."""

    t: float
    service: str
    replicas: int  # serving: ready + starting (what the backend reports)
    starting: int
    draining: int
    waiting: int
    in_flight: int
    oldest_age: float | None
    desired: int | None
    action: str
    warm: int = 0  # warm-pool replicas (booting or booted), beside the serving ones


class DecisionRecord(NamedTuple):
    """decide()'s output for one service at one cycle."""

    t: float
    service: str
    current: int | None
    desired: int | None
    action: str
    emergency: bool
    reasons: tuple[str, ...]
    recommended: int | None


class Action(NamedTuple):
    """A replica change the modelled backend carried out (what record_action was given)."""

    t: float
    service: str
    before: int
    after: int
    asked: int  # the desired count; after != asked when too few replicas were idle


@dataclass
class TaskLog:
    """Every task of one queue, indexed by task id (publish order, which is also start order)."""

    queue: str
    service: str
    publish: array
    start: array
    end: array  # nan while unfinished
    replica: array  # replica id the task ran on

    def latencies(self) -> list[float]:
        """Start minus publish for every started task (bench/burst_drain.py's latency)."""
        return [s - p for s, p in zip(self.start, self.publish, strict=False)]

    def completions(self) -> list[float]:
        """End minus publish for every finished task."""
        return [e - p for e, p in zip(self.end, self.publish, strict=True) if e == e]


@dataclass
class ReplicaLife:
    """One replica's life: when it was asked for, became ready, started draining, was gone."""

    service: str
    id: int
    created: float
    ready: float | None = None
    drain_start: float | None = None
    gone: float | None = None
    warm: bool = False  # started as a warm-pool replica


@dataclass
class SimResult:
    """Everything a run produced: per-cycle steps, decisions, actions, tasks, replica costs."""

    policy: Policy
    model: Model
    seed: int
    horizon_s: float  # the time the run stopped (the last cycle is at or before it)
    trace_duration_s: float
    first_arrival: float | None
    steps: list[Step]
    decisions: list[DecisionRecord]
    actions: list[Action]
    tasks: dict[str, TaskLog]
    replicas: list[ReplicaLife]
    replica_seconds: dict[str, float]  # starting, ready and draining replicas all cost
    warm_seconds: dict[str, float]  # warm-pool replicas: booting, waiting and being stopped
    peak_replicas: dict[str, int]
    cycles: int
    settle_s: float
    stats: dict[str, float] = field(default_factory=dict)

    def service_tasks(self, service: str) -> list[TaskLog]:
        return [log for log in self.tasks.values() if log.service == service]

    @property
    def published(self) -> int:
        return sum(len(log.publish) for log in self.tasks.values())

    @property
    def completed(self) -> int:
        return sum(1 for log in self.tasks.values() for e in log.end if e == e)
