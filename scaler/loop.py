"""The scaler's control loop: observe -> decide -> act -> record, once per interval.

Like the Kubernetes HPA, the arithmetic lives elsewhere (``scaler.decide``, a pure function); this
module does the I/O around it and the safety rules that belong to acting:

- a failed scale is retried with backoff inside the cycle, reported, and never recorded in the
  history as done (so it starts no cooldown); a service whose scale keeps failing backs off on
  its own (its next attempt waits 2, 4, 8 intervals) while every other service keeps its pace;
- never a blind scale-down: a "down" is refused unless the service's replica count and every one
  of its queue signals were read this cycle (the core holds on missing data; this is the belt to
  its braces);
- every decision is logged as one JSON line with its reasons;
- SIGHUP reloads the policy between cycles; an invalid file is refused, the last good policy stays
  in force and the error is logged and shown in status until a good file loads;
- cycles whose shared parts fail (signals, reconcile, overrides, the lease) back off (the interval
  doubles, up to a cap) so a dead broker is not hammered, and the first clean cycle returns to
  the normal pace; one service's failing scale never slows the others;
- decisions run on the monotonic clock (``clock``): a wall-clock step neither empties nor freezes
  the stabilisation windows, cooldowns and the idle timer; the wall clock (``wall_clock``) only
  stamps the status snapshot for people;
- with a leader lease, only the leader acts (reconcile and scale). The flag is read once per
  cycle and checked again right before every scale call, and the cycle's actions carry a fence
  (``scaler.fencing``) that the backends check right before each engine call, in their drain and
  replacement threads too, so a lease lost mid-cycle (or mid-drain) stops action. When a cycle
  starts and after it ends the loop tells the lease by when it must end (``stall_budget_s``): a
  cycle that hangs past that loses the lease (``scaler.leader``), and the standby takes over.
  A standby still observes, decides and reports (marked "standby: not the leader"), and re-reads
  the backend's view each cycle so that, on taking over, it knows the workers the old leader ran;
- operator overrides (pause, pin) are read every cycle; if they cannot be read every service
  holds, because an operator may have paused one and we cannot tell.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler.arming import ring_level
from scaler.backends.base import Backend, BackendEvent, ScaleResult, ServiceSpec
from scaler.backends.stranded import ACTIONS as CONSUMERLESS_ACTIONS
from scaler.control import ControlStore, ControlUnavailable, Override
from scaler.decide import Decision, ServiceControl, decide, queue_totals
from scaler.fencing import UNFENCED, Fence, LeadershipLost
from scaler.history import History
from scaler.leader import LeaderLease
from scaler.live import LiveFeed
from scaler.metrics import ScalerMetrics
from scaler.observations import Observations
from scaler.policy import Policy, PolicyError, load_policy
from scaler.restore import RESTORE_FAILED, RESTORED, UnackedRestorer
from scaler.signals.collector import Collector
from scaler.status import ServiceStatus, Snapshot, write_snapshot
from scaler.wakeup import Alarm, WakeupDetector, Watch

log = logging.getLogger("scaler.loop")
decision_log = logging.getLogger("scaler.decisions")

MAX_BACKOFF_FACTOR = 8  # a failing scaler still looks every 8 intervals at most
STANDBY_NOTE = "standby: not the leader"
UNREADABLE_NOTE = "overrides unreadable: holding in case one is set"


@dataclass
class PolicySource:
    """The policy in force, and where it came from; reloads keep the last good one on error."""

    policy: Policy
    path: Path | None = None
    loaded_at: float | None = None
    error: str | None = None

    @classmethod
    def from_file(cls, path: Path) -> PolicySource:
        """Load ``path``; raises PolicyError (the first load has no good policy to fall back on)."""
        return cls(load_policy(path), path, time.time())

    def reload(self) -> bool:
        """Re-read the file; on error keep the current policy and remember why. True if loaded."""
        if self.path is None:
            return False
        try:
            self.policy = load_policy(self.path)
        except PolicyError as exc:
            self.error = f"{self.path}: " + "; ".join(exc.problems)
            log.error(json.dumps({"event": "policy-reload-refused", "error": self.error}))
            return False
        self.loaded_at, self.error = time.time(), None
        log.info(json.dumps({"event": "policy-reloaded", "path": str(self.path)}))
        return True


@dataclass(frozen=True)
class Retry:
    """How a failing backend call is retried within one cycle."""

    attempts: int = 3
    first_delay_s: float = 0.2
    factor: float = 2.0


@dataclass(frozen=True)
class ActOutcome:
    """What acting on one decision did."""

    acted: bool
    result: ScaleResult | None = None
    error: str | None = None
    note: str | None = None  # why nothing was done when that is not an error (standby)
    scale_failed: bool = False  # the backend refused every attempt (starts the service's backoff)


@dataclass(frozen=True)
class ServiceBackoff:
    """A service whose scale failed ``failures`` times in a row: no new attempt before ``until``."""

    failures: int
    until: float  # on the loop's monotonic clock


@dataclass(frozen=True)
class CycleReport:
    """One cycle's inputs and outputs, for callers and tests."""

    observations: Observations
    decisions: Mapping[str, Decision]
    outcomes: Mapping[str, ActOutcome]
    errors: tuple[str, ...]
    leading: bool = True  # this replica could act this cycle (leader, or no election)
    overrides: Mapping[str, Override] = field(default_factory=dict)


def blind_spots(obs: Observations, service: str) -> list[str]:
    """The signals a scale-down of ``service`` would need but this cycle did not read."""
    seen = obs.services.get(service)
    if seen is None:
        return [f"{service}: no observation"]
    missing = [] if seen.replicas is not None else ["replicas"]
    missing += [f"{q} work" for q, s in seen.queues.items() if s.work is None]
    return missing


@dataclass
class Scaler:
    """Runs cycles against one backend; writes a status snapshot after each.

    ``leader`` (None: a single scaler, always acts), ``control`` (None: no pause/pin) and
    ``metrics`` (None: no Prometheus registry) are the optional surfaces of issue 5.
    """

    source: PolicySource
    backend: Backend
    collector: Collector
    state_file: Path | None = None
    dry_run: bool = False
    retry: Retry = field(default_factory=Retry)
    clock: Callable[[], float] = time.monotonic  # decisions, windows, cooldowns, backoffs
    wall_clock: Callable[[], float] = time.time  # the snapshot's time stamp, for people
    sleep: Callable[[float], None] = time.sleep
    history: History = field(default_factory=History)
    leader: LeaderLease | None = None
    stall_s: float | None = None  # see stall_budget_s
    control: ControlStore | None = None
    metrics: ScalerMetrics | None = None
    cycles: int = 0
    consecutive_failures: int = 0
    events: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    # Per service: workers found consuming none of their queues, by action, and the last event.
    consumerless: dict[str, dict[str, int | str]] = field(default_factory=dict)
    backoffs: dict[str, ServiceBackoff] = field(default_factory=dict)
    recorder_status: Callable[[], Mapping[str, Any]] | None = None  # the flight recorder's state
    live: LiveFeed | None = None  # the dashboard's history and event feed (LiveFeed.attach)
    # Gives dead workers' unacked messages back (scaler.restore): the backends on each death;
    # the loop at start and takeover for workers that died while no scaler watched.
    restorer: UnackedRestorer | None = None
    # Event-driven detection (scaler.wakeup): rings ``alarm`` when a message lands on an armed
    # service's queue, so the loop's wait between cycles ends early. None: polling only.
    detector: WakeupDetector | None = None
    alarm: Alarm = field(default_factory=Alarm)
    _sweep_pending: bool = field(default=True, init=False)
    _reload: threading.Event = field(default_factory=threading.Event, init=False)
    _managed: tuple[ServiceSpec, ...] = field(default=(), init=False)
    last_snapshot: Snapshot | None = field(default=None, init=False)
    _was_leading: bool = field(default=False, init=False)

    def request_reload(self) -> None:
        """Ask for a policy reload before the next cycle (safe from a signal handler)."""
        self._reload.set()

    def _sync_backend(self, refresh: bool = False) -> None:
        """Tell the backend which services it manages; ``refresh`` re-reads its view even when
        the policy did not change (a standby adopting what the leader runs)."""
        policy = self.source.policy
        specs = tuple(
            ServiceSpec(
                name,
                tuple(svc.queues),
                unresponsive_after_s=policy.unresponsive_after_s,
                allowed_bind_mounts=tuple(policy.clone.allowed_bind_mounts),
            )
            for name, svc in policy.services.items()
        )
        if refresh or specs != self._managed:
            self.backend.manage(list(specs))
            self._managed = specs

    def is_leading(self) -> bool:
        """May this replica act? Always without a lease; otherwise only while it holds it."""
        return self.leader is None or self.leader.is_leader()

    def fence(self) -> Fence:
        """The fence for actions starting now: the lease's, or none without election."""
        return UNFENCED if self.leader is None else self.leader.fence()

    def stall_budget_s(self) -> float:
        """How long one cycle may take before the loop counts as stuck (and the lease lapses):
        ``stall_s`` if set, else the lease less its safety margin and at least 10 s (the cycle's
        own retries and timeouts). A hung cycle then loses the key ``budget + safety`` after it
        began: one lease with the default, as if the process had died then."""
        if self.stall_s is not None:
            return self.stall_s
        if self.leader is None:
            return 10.0
        return max(10.0, self.leader.lease_s - self.leader.safety_s)

    def _expect_progress(self, cycle_starts: bool = False) -> None:
        """Tell the lease when the cycle starting now (or the next one) must have ended."""
        if self.leader is not None:
            delay = 0.0 if cycle_starts else self.next_delay()
            self.leader.expect_progress(delay + self.stall_budget_s())

    def _read_controls(
        self, policy: Policy, errors: list[str]
    ) -> tuple[dict[str, ServiceControl], dict[str, Override]]:
        if self.control is None:
            return {}, {}
        try:
            overrides = self.control.overrides()
        except ControlUnavailable as exc:
            errors.append(f"control: {exc}")
            held = ServiceControl(paused=True, note=UNREADABLE_NOTE)
            return {name: held for name in policy.services}, {}
        # A malformed stored override is ignored (the service is decided without it) and said
        # once in the event feed; the control store has logged it.
        for bad in self.control.new_rejections():
            self.events.append(f"{bad.service} override-rejected: {bad} (ignored)")
        return {s: o.as_control() for s, o in overrides.items()}, overrides

    def cycle(self) -> CycleReport:
        """One observe -> decide -> act -> record pass."""
        started = time.monotonic()
        self._expect_progress(cycle_starts=True)  # a hung cycle loses the lease (leader.py)
        if self.detector is not None:  # arrivals wait for this cycle's arming
            self.detector.deciding()
        if self._reload.is_set():
            self._reload.clear()
            self.source.reload()
        policy = self.source.policy
        errors: list[str] = []
        leading = self.is_leading()  # once per cycle; _act checks again before each scale
        fence = self.fence()  # the lease this cycle's actions run under
        self.backend.begin_cycle()  # the cycle's reads may share one listing; actions re-list
        # A standby re-reads the backend every cycle, and so does a replica that just became
        # leader: either way the workers may have been started by another scaler.
        self._sync_backend(refresh=not leading or not self._was_leading)
        self._sweep_pending |= leading and not self._was_leading  # a start or a takeover
        self._was_leading = leading
        if self.leader is not None and self.leader.last_error:
            errors.append(f"leader: {self.leader.last_error}")
        if leading and not self.dry_run:
            try:
                for event in self.backend.reconcile(fence=fence):
                    self._backend_event(event)
            except LeadershipLost as exc:
                errors.append(f"leader: lease lost during reconcile: {exc}")
            except Exception as exc:
                errors.append(f"backend: reconcile failed: {exc}")
            self._sweep_dead_owners(policy)
        queues = {name: list(svc.queues) for name, svc in policy.services.items()}
        obs = self.collector.collect(queues, self.backend)
        errors.extend(obs.errors)
        controls, overrides = self._read_controls(policy, errors)
        shared_failed = bool(errors)  # what every service depends on: the loop backs off
        now = self.clock()
        decisions, history = decide(policy, obs, self.history, now, controls)
        outcomes: dict[str, ActOutcome] = {}
        for service, decision in decisions.items():
            outcome = self._act_paced(obs, decision, now, leading=leading, fence=fence)
            if outcome.result is not None:
                r = outcome.result
                history = history.record_action(service, r.before, r.after, now)
            if outcome.error:
                errors.append(outcome.error)
            outcomes[service] = outcome
            self._log_decision(decision, outcome)
        self.history = history
        self.cycles += 1
        self._expect_progress()
        self.consecutive_failures = self.consecutive_failures + 1 if shared_failed else 0
        report = CycleReport(obs, decisions, outcomes, tuple(errors), leading, overrides)
        duration = time.monotonic() - started
        self._watch_arrivals(report)
        self._record(report, duration)
        if self.live is not None:
            try:
                self.live.record(self, report)
            except Exception:  # the dashboard never stops the loop
                log.exception(json.dumps({"event": "live-feed-failed"}))
        if self.metrics is not None:
            self.metrics.record_cycle(
                observations=obs,
                decisions=decisions.values(),
                duration_s=duration,
                leader=leading,
                errors=errors,
                overrides={s: o.mode for s, o in overrides.items()},
                policy=policy,
                scale_failed=[s for s, o in outcomes.items() if o.scale_failed],
            )
        return report

    def _backend_event(self, event: BackendEvent) -> None:
        text = f"{event.service} {event.kind}: {event.detail}"
        self.events.append(text)
        level = logging.INFO if event.kind == "drained" else logging.WARNING
        fields: dict[str, Any] = {"event": "backend", "detail": text}
        if event.kind == RESTORED:
            fields.update(kind=RESTORED, service=event.service, count=event.count)
            if self.metrics is not None:
                self.metrics.record_restored(event.service, event.count)
        elif event.kind == RESTORE_FAILED:
            self._sweep_pending = True  # try again next cycle, from the owner hash
        elif event.kind in CONSUMERLESS_ACTIONS:  # the standing consumer check (stranded.py)
            action = CONSUMERLESS_ACTIONS[event.kind]
            counts = self.consumerless.setdefault(event.service, {"last": ""})
            counts[action] = int(counts.get(action) or 0) + 1
            counts["last"] = f"{event.kind}: {event.detail}"
            if self.metrics is not None:
                self.metrics.record_consumerless(event.service, action)
        log.log(level, json.dumps(fields))

    def _sweep_dead_owners(self, policy: Policy) -> None:
        """At a start or takeover (or after a failed restore): give back what dead owners hold,
        dead as the engine says (scaler.restore.UnackedRestorer.sweep), never on a missed ping
        of a worker whose container runs."""
        if self.restorer is None or not self._sweep_pending:
            return
        queue_service = {q: name for name, svc in policy.services.items() for q in svc.queues}

        def workers() -> tuple[set[str], set[str], set[str]]:
            """Listed afresh, after the owners were read: no owner's container is missed."""
            self.backend.begin_cycle()
            listed = [w for name in policy.services for w in self.backend.workers(name)]
            live = [w for w in listed if w.state in ("running", "draining")]
            exited = {w.host for w in listed if w.state in ("dead", "stopped") and w.host}
            return {w.name for w in live}, {w.host for w in live if w.host}, exited

        try:
            result = self.restorer.sweep(workers, queues=queue_service)
        except Exception as exc:
            log.warning(json.dumps({"event": "restore-sweep-failed", "error": str(exc)}))
            return  # still pending: the next cycle tries again
        self._sweep_pending = False
        by_service: dict[str, int] = {}
        for queue, count in result.by_queue.items():
            service = queue_service.get(queue, "?")
            by_service[service] = by_service.get(service, 0) + count
        nodes = ", ".join(sorted(result.by_node))
        for service, count in sorted(by_service.items()):
            self._backend_event(
                BackendEvent(
                    service,
                    RESTORED,
                    f"{count} unacked message(s) of {nodes} (not alive, found at start or "
                    "takeover) back on their queues",
                    count=count,
                )
            )

    def _act_paced(
        self,
        obs: Observations,
        decision: Decision,
        now: float,
        *,
        leading: bool,
        fence: Fence = UNFENCED,
    ) -> ActOutcome:
        """Act unless the service is backing off after failed scales; keep its backoff current.

        A failing service waits 2, 4, 8 intervals (MAX_BACKOFF_FACTOR) between attempts, on its
        own: the other services' cycles are not slowed. Its first success clears the backoff.
        """
        service = decision.service
        backoff = self.backoffs.get(service)
        wants_action = decision.action != "hold" and not self.dry_run and leading
        if backoff is not None and wants_action and now < backoff.until:
            return ActOutcome(
                acted=False,
                note=f"backing off after {backoff.failures} failed scale(s): next attempt in "
                f"{backoff.until - now:.1f} s",
            )
        outcome = self._act(obs, decision, leading=leading, fence=fence)
        if outcome.acted:
            self.backoffs.pop(service, None)
        elif outcome.scale_failed:
            failures = (backoff.failures if backoff else 0) + 1
            wait = self.source.policy.interval_s * min(2**failures, MAX_BACKOFF_FACTOR)
            self.backoffs[service] = ServiceBackoff(failures, now + wait)
        return outcome

    def _act(
        self,
        obs: Observations,
        decision: Decision,
        *,
        leading: bool = True,
        fence: Fence = UNFENCED,
    ) -> ActOutcome:
        pool_moves = decision.warm != decision.warm_current  # refill or trim the warm pool
        if (decision.action == "hold" and not pool_moves) or decision.desired is None:
            return ActOutcome(acted=False)
        if self.dry_run:
            return ActOutcome(acted=False)
        if not leading:
            return ActOutcome(acted=False, note=STANDBY_NOTE)
        if decision.action == "down":
            missing = blind_spots(obs, decision.service)
            if missing:
                return ActOutcome(
                    acted=False,
                    error=f"{decision.service}: scale-down refused, unread: {', '.join(missing)}",
                )
        delay = self.retry.first_delay_s
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            if not self.is_leading():  # the lease may have lapsed since the cycle began
                return ActOutcome(
                    acted=False,
                    error=f"leader: lease lost before scaling {decision.service} to "
                    f"{decision.desired}: not acting",
                )
            try:
                # The pool's size only when there is one to keep (backends before it take none).
                pool = {"warm": decision.warm} if decision.warm or decision.warm_current else {}
                result = self.backend.scale(decision.service, decision.desired, fence=fence, **pool)
                return ActOutcome(acted=True, result=result)
            except LeadershipLost as exc:  # not the engine's fault: no retry, no backoff
                return ActOutcome(acted=False, error=f"leader: lease lost while scaling: {exc}")
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning(
                    json.dumps(
                        {"event": "scale-failed", "service": decision.service,
                         "attempt": attempt, "error": last}
                    )
                )  # fmt: skip
                if attempt < self.retry.attempts:
                    self.sleep(delay)
                    delay *= self.retry.factor
        return ActOutcome(
            acted=False,
            error=f"{decision.service}: scale to {decision.desired} failed after "
            f"{self.retry.attempts} attempts: {last}",
            scale_failed=True,
        )

    def _log_decision(self, decision: Decision, outcome: ActOutcome) -> None:
        decision_log.info(
            json.dumps(
                {
                    "event": "decision",
                    "cycle": self.cycles,
                    "service": decision.service,
                    "current": decision.current,
                    "desired": decision.desired,
                    "action": decision.action,
                    "emergency": decision.emergency,
                    "reasons": list(decision.reasons),
                    "acted": outcome.acted,
                    "dry_run": self.dry_run,
                    "error": outcome.error,
                    "note": outcome.note,
                }
            )
        )

    def _record(self, report: CycleReport, duration_s: float) -> None:
        policy = self.source.policy
        services: dict[str, ServiceStatus] = {}
        for name, svc in policy.services.items():
            decision = report.decisions.get(name)
            outcome = report.outcomes.get(name, ActOutcome(acted=False))
            seen = report.observations.services.get(name)
            signals = list(seen.queues.values()) if seen else []
            waiting = [s.waiting for s in signals]
            flight = [s.in_flight for s in signals]
            ages = [s.oldest_age_s for s in signals if s.oldest_age_s is not None]
            override = report.overrides.get(name)
            services[name] = ServiceStatus(
                service=name,
                current=seen.replicas if seen else None,
                desired=decision.desired if decision else None,
                action=("error" if outcome.error else decision.action) if decision else "hold",
                reasons=tuple(decision.reasons) if decision else (),
                waiting=None if None in waiting else sum(w for w in waiting if w is not None),
                in_flight=None if None in flight else sum(f for f in flight if f is not None),
                oldest_age_s=max(ages) if ages else None,
                min_replicas=svc.min_replicas,
                max_replicas=svc.max_replicas,
                emergency=bool(decision.emergency) if decision else False,
                acted=outcome.acted,
                error=outcome.error,
                note=outcome.note,
                override=_override_label(override),
                not_due=sum(s.not_due for s in signals),
                abandoned=sum(s.abandoned for s in signals),
                warm=seen.warm if seen else None,
                warm_target=decision.warm if decision else 0,
            )
        host = report.observations.host
        snapshot = Snapshot(
            written_at=self.wall_clock(),
            cycle=self.cycles,
            backend=self.backend.name,
            dry_run=self.dry_run,
            policy_file=str(self.source.path) if self.source.path else None,
            policy_loaded_at=self.source.loaded_at,
            policy_error=self.source.error,
            cycle_duration_s=duration_s,
            consecutive_failures=self.consecutive_failures,
            errors=report.errors,
            events=tuple(self.events),
            host={"cpu_percent": host.cpu_percent, "memory_percent": host.memory_percent},
            services=services,
            role=self._role(report.leading),
            leader=self._lease_view(),
            overrides={s: o.as_json() for s, o in report.overrides.items()},
            recorder=dict(self.recorder_status()) if self.recorder_status else None,
            detection=self._detection_view(),
            consumerless={s: dict(c) for s, c in self.consumerless.items()},
        )
        self.last_snapshot = snapshot
        if self.state_file is not None:
            try:
                write_snapshot(self.state_file, snapshot)
            except OSError as exc:
                log.error(json.dumps({"event": "status-write-failed", "error": str(exc)}))

    def _role(self, leading: bool) -> str:
        if self.leader is None:
            return "single"
        return "leader" if leading else "standby"

    def _lease_view(self) -> dict[str, Any] | None:
        """This replica's lease state plus who holds the key now (None without election)."""
        if self.leader is None:
            return None
        view = self.leader.state().as_json()
        view["holder"] = self.leader.holder()
        return view

    def status_view(self) -> dict[str, Any]:
        """The last snapshot as a dict, for HTTP /status (a stub before the first cycle)."""
        snapshot = self.last_snapshot
        if snapshot is None:
            return {"cycle": 0, "services": {}, "note": "no cycle finished yet"}
        return snapshot.to_dict()

    def next_delay(self) -> float:
        """The interval, doubled per consecutive failing cycle up to MAX_BACKOFF_FACTOR."""
        factor = min(2**self.consecutive_failures, MAX_BACKOFF_FACTOR)
        return self.source.policy.interval_s * factor

    def run(self, stop: threading.Event, max_cycles: int | None = None) -> None:
        """Cycle until ``stop`` is set (or ``max_cycles`` ran); a crashing cycle is logged."""
        if self.leader is not None:  # the first cycle, too, must end in time to keep the lease
            self.leader.expect_progress(self.stall_budget_s())
        while not stop.is_set():
            try:
                self.cycle()
            except Exception:
                self.consecutive_failures += 1
                log.exception(json.dumps({"event": "cycle-crashed"}))
            if self.detector is not None:
                self.detector.resume()
            if max_cycles is not None and self.cycles >= max_cycles:
                return
            # The interval, cut short when an arrival on an armed service's queue rings.
            woken = self.alarm.wait(self.next_delay(), stop)
            if woken and not stop.is_set():
                log.info(json.dumps({"event": "wakeup", "services": sorted(woken)}))

    def _watch_arrivals(self, report: CycleReport) -> None:
        """Arm the detector by ``scaler.arming``'s rule: a new backlog on an idle service at its
        minimum (or short of its target), or a backlog grown past what a held decision saw, is
        decided at once; a standby arms none."""
        if self.detector is None:
            return
        policy = self.source.policy
        levels: dict[str, int] = {}
        for name, svc in policy.services.items():
            seen = report.observations.services.get(name)
            signals = [seen.queues[q] for q in svc.queues if q in seen.queues] if seen else []
            level = ring_level(
                svc,
                report.decisions.get(name),
                seen.replicas if seen else None,
                *queue_totals(signals),
            )
            if level is not None:
                levels[name] = level
        queues = {q: name for name, svc in policy.services.items() for q in svc.queues}
        self.detector.watch(
            Watch(
                queues,
                frozenset(levels if report.leading else ()),
                enabled=policy.wakeup.events,
                debounce_s=policy.wakeup.debounce_s,
                levels={k: v for k, v in levels.items() if v} if report.leading else {},
            )
        )
        if self.metrics is not None:
            self.metrics.record_detection(self.detector.status())

    def _detection_view(self) -> dict[str, Any]:
        """How new backlogs are noticed, for the status: events (and from where) or polling."""
        if self.detector is None:
            off = not self.source.policy.wakeup.events
            reason = "wakeup.events is off in the policy" if off else "no event detector running"
            return {"mode": "polling", "source": None, "reason": reason}
        return self.detector.status()


def _override_label(override: Override | None) -> str | None:
    if override is None:
        return None
    return "paused" if override.mode == "pause" else f"pinned {override.replicas}"
