"""The scaler's Prometheus metrics, in a registry of its own.

A registry per scaler (not prometheus_client's global one) keeps tests and two scalers in one
process from sharing counters, and keeps library collectors out of /metrics. The loop calls one
function per cycle, :meth:`ScalerMetrics.record_cycle`, with the cycle's plain values; everything
the HTTP endpoint exposes comes from there.

A signal that could not be read is not exported as 0 (that would read as "empty queue"): its
series is removed for that cycle, and the error counter says why. Likewise a value that does not
exist (the oldest message's age of an empty queue) is absent, not 0.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from scaler.backends.stranded import ACTIONS as CONSUMERLESS_ACTIONS
from scaler.decide import Decision
from scaler.observations import Observations
from scaler.policy import Policy

# Bounded label values: free text (reasons in words) never becomes a label.
ACTIONS = ("up", "down", "hold")
ERROR_SOURCES = ("broker", "docker", "policy", "control", "leader", "backend", "other")
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class DecisionRecord:
    """What the metrics need from one service's decision in one cycle.

    ``reason_kind`` is a short fixed word (see REASON_KINDS), not the reasons in words.
    """

    service: str
    current: int | None
    desired: int | None
    action: str  # one of ACTIONS
    reason_kind: str

    @classmethod
    def of(cls, decision: Decision | DecisionRecord) -> DecisionRecord:
        if isinstance(decision, DecisionRecord):
            return decision
        return cls(
            service=decision.service,
            current=decision.current,
            desired=decision.desired,
            action=decision.action,
            reason_kind=reason_kind(decision),
        )


# Ordered: the first kind whose words appear in a decision's reasons names it. The words are the
# decision core's (scaler.decide); anything else is "target" (plain target tracking).
REASON_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("paused", ("paused by operator",)),
    ("pinned", ("pinned to", "pinned,")),
    (
        "missing-signal",
        ("holding at", "unknown: holding", "not observed", "unreadable", "stale", "missing"),
    ),
    ("host-guard", ("no scale-up (would be", "gives way")),
    ("cooldown", ("cooldown:",)),
    ("step-limit", ("step limit",)),
    ("window", ("window",)),
    ("scale-to-zero", ("quiet period",)),
    ("latency", ("objective",)),
    ("saturation", ("saturated",)),
)


def reason_kind(decision: Decision) -> str:
    """A bounded label for why a decision came out as it did (for the decisions counter)."""
    if decision.emergency:
        return "emergency"
    text = " | ".join(decision.reasons)
    for kind, words in REASON_KINDS:
        if any(word in text for word in words):
            return kind
    return "target"


def error_source(message: str) -> str:
    """The source label for an error line. The loop's and collectors' lines start with their
    source ("broker: ...", "backend: ..."); a bare source name is itself."""
    head = message.split(":", 1)[0].strip().lower()
    if head in ERROR_SOURCES:
        return head
    lowered = message.lower()
    for source, words in (
        ("broker", ("redis", "amqp", "rabbit", "broker")),
        ("docker", ("docker", "container")),
        ("policy", ("policy",)),
        ("backend", ("scale", "backend", "reconcile")),
    ):
        if any(word in lowered for word in words):
            return source
    return "other"


class ScalerMetrics:
    """All of the scaler's metric families, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge(
            "scaler_queue_depth", "Messages waiting in the broker queue", ["queue"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "scaler_queue_oldest_age_seconds",
            "Age of the oldest waiting message (absent when none waits or it is unknown)",
            ["queue"],
            registry=r,
        )
        self.queue_in_flight = Gauge(
            "scaler_queue_in_flight",
            "Messages taken by a worker but not yet acknowledged",
            ["queue"],
            registry=r,
        )
        self.replicas_current = Gauge(
            "scaler_replicas_current", "Replicas running now", ["service"], registry=r
        )
        self.replicas_warm = Gauge(
            "scaler_replicas_warm",
            "Warm-pool replicas: booted (or booting) but consuming nothing, not capacity",
            ["service"],
            registry=r,
        )
        self.replicas_desired = Gauge(
            "scaler_replicas_desired",
            "Replicas the last decision asked for",
            ["service"],
            registry=r,
        )
        self.service_cpu = Gauge(
            "scaler_service_cpu_percent",
            "Mean CPU of a service's replicas",
            ["service"],
            registry=r,
        )
        self.service_memory = Gauge(
            "scaler_service_memory_percent",
            "Mean memory of a service's replicas",
            ["service"],
            registry=r,
        )
        self.decisions = Counter(
            "scaler_decisions",
            "Decisions by service, action and kind of reason",
            ["service", "action", "reason_kind"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            "scaler_cycle_duration_seconds",
            "Time of one observe-decide-act cycle",
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.errors = Counter("scaler_errors", "Errors by source", ["source"], registry=r)
        self.leader = Gauge("scaler_leader", "1 while this replica holds the lease", registry=r)
        self.host_cpu = Gauge("scaler_host_cpu_percent", "Host CPU in use", registry=r)
        self.host_memory = Gauge("scaler_host_memory_percent", "Host memory in use", registry=r)
        self.override = Gauge(
            "scaler_override",
            "1 while an operator override (pause or pin) holds the service",
            ["service", "mode"],
            registry=r,
        )
        self.restored = Counter(
            "scaler_restored_messages",
            "A dead worker's unacked messages put back on their queues (Redis)",
            ["service"],
            registry=r,
        )
        self.consumerless = Counter(
            "scaler_consumerless_workers",
            "Serving workers found consuming none of their service's queues (the standing "
            "consumer check, scaler.backends.stranded), by what was done: restored, "
            "restore_failed, replaced, persists",
            ["service", "action"],
            registry=r,
        )
        self.last_cycle = Gauge(
            "scaler_last_cycle_timestamp_seconds", "Wall-clock time of the last cycle", registry=r
        )
        # The policy in force, for alerts and dashboards that compare against it.
        self.replicas_min = Gauge(
            "scaler_replicas_min", "min_replicas of the policy in force", ["service"], registry=r
        )
        self.replicas_max = Gauge(
            "scaler_replicas_max", "max_replicas of the policy in force", ["service"], registry=r
        )
        self.latency_objective = Gauge(
            "scaler_latency_objective_seconds",
            "The service's latency objective (target.latency_s); absent when it has none",
            ["service"],
            registry=r,
        )
        self.queue_service = Gauge(
            "scaler_queue_service_info",
            "1 per queue and the service consuming it (join queue series to services)",
            ["queue", "service"],
            registry=r,
        )
        self.scale_failures = Counter(
            "scaler_scale_failures",
            "Scales of a service that failed every attempt within a cycle",
            ["service"],
            registry=r,
        )
        # Event-driven detection (scaler.wakeup); absent until the loop reports it.
        self.detection_up = Gauge(
            "scaler_event_detection_up",
            "1 while queue events can start decisions at once; 0 while the scaler only polls "
            "(the reason is in /status detection.reason)",
            registry=r,
        )
        self.event_wakeups = Counter(
            "scaler_event_wakeups",
            "Decisions started early by an arrival on a service's queue (after debouncing)",
            ["service"],
            registry=r,
        )
        self.event_coalesced = Counter(
            "scaler_event_arrivals_coalesced",
            "Arrivals folded into an earlier wake-up by the debounce window",
            registry=r,
        )
        self._wakeups_seen: dict[str, int] = {}
        self._coalesced_seen = 0
        for source in ERROR_SOURCES:  # present from the start, so rate() works from zero
            self.errors.labels(source=source)
        self._lock = threading.Lock()
        self._last_cycle_monotonic: float | None = None
        self._seen: dict[Gauge, set[tuple[str, ...]]] = {}

    # -- what the loop calls --------------------------------------------------------------------

    def record_cycle(
        self,
        *,
        observations: Observations | None,
        decisions: Iterable[Decision | DecisionRecord] = (),
        duration_s: float,
        leader: bool,
        errors: Iterable[str] = (),
        overrides: Mapping[str, str] = {},
        clock: Callable[[], float] = time.monotonic,
        policy: Policy | None = None,
        scale_failed: Iterable[str] = (),
    ) -> None:
        """Record one cycle: the loop's observations, decisions (``report.decisions.values()``),
        error lines (each counted under :func:`error_source`), whether this replica leads, and
        ``overrides`` as service -> "pause" or "pin", and the ``policy`` in force (its limits,
        objectives and queue-to-service map), and the services whose scale failed every attempt."""
        if not duration_s >= 0 or math.isinf(duration_s):
            raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s!r}")
        with self._lock:
            if observations is not None:
                self._record_observations(observations)
            desired: dict[tuple[str, ...], float] = {}
            for decision in decisions:
                record = DecisionRecord.of(decision)
                self._record_decision(record)
                if record.desired is not None:
                    desired[(record.service,)] = float(record.desired)
            if desired:  # a cycle without decisions (e.g. observe only) keeps the last ones
                self._set_series(self.replicas_desired, desired)
            if policy is not None:
                self._record_policy(policy)
            for error in errors:
                self.errors.labels(source=error_source(error)).inc()
            for service in scale_failed:
                self.scale_failures.labels(service=service).inc()
            self._set_series(self.override, {(s, m): 1.0 for s, m in overrides.items()})
            self.cycle_duration.observe(duration_s)
            self.leader.set(1 if leader else 0)
            self.last_cycle.set(time.time())
            self._last_cycle_monotonic = clock()

    def record_detection(self, status: Mapping[str, Any]) -> None:
        """The detector's status (WakeupDetector.status()): up or not, and its running totals,
        turned into counter increments."""
        with self._lock:
            self.detection_up.set(1 if status.get("mode") == "events" else 0)
            for service, total in (status.get("wakeups") or {}).items():
                seen = self._wakeups_seen.get(service, 0)
                if total > seen:
                    self.event_wakeups.labels(service=service).inc(total - seen)
                self._wakeups_seen[service] = total
            coalesced = int(status.get("coalesced") or 0)
            if coalesced > self._coalesced_seen:
                self.event_coalesced.inc(coalesced - self._coalesced_seen)
            self._coalesced_seen = coalesced

    def record_restored(self, service: str, count: int) -> None:
        """Count messages restored from a dead worker of ``service``."""
        if count > 0:
            self.restored.labels(service=service).inc(count)

    def record_consumerless(self, service: str, action: str) -> None:
        """Count one worker of ``service`` found consuming nothing and what was done."""
        self.consumerless.labels(service=service, action=action).inc()

    def record_error(self, error: str) -> None:
        """Count an error outside a cycle (e.g. the leader lease's own thread)."""
        self.errors.labels(source=error_source(error)).inc()

    def last_cycle_monotonic(self) -> float | None:
        """When the last cycle was recorded (time.monotonic), for /healthz."""
        with self._lock:
            return self._last_cycle_monotonic

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    # -- internals ------------------------------------------------------------------------------

    def _record_observations(self, obs: Observations) -> None:
        depth: dict[tuple[str, ...], float] = {}
        age: dict[tuple[str, ...], float] = {}
        in_flight: dict[tuple[str, ...], float] = {}
        current: dict[tuple[str, ...], float] = {}
        warm: dict[tuple[str, ...], float] = {}
        cpu: dict[tuple[str, ...], float] = {}
        memory: dict[tuple[str, ...], float] = {}
        for name, service in obs.services.items():
            _put(current, (name,), service.replicas)
            _put(warm, (name,), service.warm if service.replicas is not None else None)
            _put(cpu, (name,), service.workers.cpu_percent)
            _put(memory, (name,), service.workers.memory_percent)
            for queue, signal in service.queues.items():
                _put(depth, (queue,), signal.waiting)
                _put(in_flight, (queue,), signal.in_flight)
                # An empty queue has no oldest message: its age is absent (unknown), never
                # "0 s old", which would read as a message that just arrived.
                _put(age, (queue,), signal.oldest_age_s)
        self._set_series(self.queue_depth, depth)
        self._set_series(self.queue_oldest_age, age)
        self._set_series(self.queue_in_flight, in_flight)
        self._set_series(self.replicas_current, current)
        self._set_series(self.replicas_warm, warm)
        self._set_series(self.service_cpu, cpu)
        self._set_series(self.service_memory, memory)
        _set_or_nan(self.host_cpu, obs.host.cpu_percent)
        _set_or_nan(self.host_memory, obs.host.memory_percent)

    def _record_policy(self, policy: Policy) -> None:
        lows: dict[tuple[str, ...], float] = {}
        highs: dict[tuple[str, ...], float] = {}
        objectives: dict[tuple[str, ...], float] = {}
        queues: dict[tuple[str, ...], float] = {}
        for name, svc in policy.services.items():
            lows[(name,)] = float(svc.min_replicas)
            highs[(name,)] = float(svc.max_replicas)
            _put(objectives, (name,), svc.target.latency_s)
            for queue in svc.queues:
                queues[(queue, name)] = 1.0
            self.scale_failures.labels(service=name)  # present from zero, for increase()
            for action in CONSUMERLESS_ACTIONS.values():
                self.consumerless.labels(service=name, action=action)
        self._set_series(self.replicas_min, lows)
        self._set_series(self.replicas_max, highs)
        self._set_series(self.latency_objective, objectives)
        self._set_series(self.queue_service, queues)

    def _record_decision(self, d: DecisionRecord) -> None:
        if d.action not in ACTIONS:
            raise ValueError(
                f"decision action for service {d.service!r} must be one of {ACTIONS}, "
                f"got {d.action!r}"
            )
        self.decisions.labels(service=d.service, action=d.action, reason_kind=d.reason_kind).inc()

    def _set_series(self, gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
        """Set these label sets and drop the ones from the last cycle that are gone (a signal
        now missing, or a service no longer in the policy)."""
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        for labels in self._seen.get(gauge, set()) - set(values):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        self._seen[gauge] = set(values)


def _put(
    target: dict[tuple[str, ...], float], labels: tuple[str, ...], value: float | None
) -> None:
    if value is not None:
        target[labels] = float(value)


def _set_or_nan(gauge: Gauge, value: float | None) -> None:
    # An unlabelled gauge cannot be removed; NaN is Prometheus's "no value".
    gauge.set(math.nan if value is None else value)
