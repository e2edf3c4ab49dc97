"""The decision core: (policy, observations, history, now) -> desired replicas and why, per service.

Pure: no I/O and no clock reads (``now`` is a parameter), so every rule is testable as a table
case and as a property. It reads like docs/scaler-policy.md, which describes the same steps:

1. operator controls: a paused service holds; a pinned one targets its pinned count;
2. hold when a needed signal (replicas, a queue's waiting or in-flight count) is missing or stale;
3. recommendation: ceil(work / tasks_per_replica) with a tolerance dead band, raised by a breached
   latency objective or saturated workers with work waiting, clamped to [min, max], kept at 1
   until a min-0 service has been idle for the quiet period;
4. stabilisation: the lowest recommendation in the up window, the highest in the down window;
5. emergency: one queue past its depth or age threshold jumps to ``scale_to`` at once;
6. cooldowns, then step limits (the emergency and bringing a service back to min skip both);
7. host guard: no scale-up while host CPU or memory is past its limit (or unknown), and under
   pressure the least urgent service with an idle replica gives one up.

The caller acts on the decisions and then records what it actually achieved with
``History.record_action`` (see ``scaler.history``): decide() never assumes its advice was followed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from scaler.history import History, ServiceHistory
from scaler.observations import Observations, Resources, ServiceObservation
from scaler.policy import Policy, ServicePolicy

__all__ = ["Decision", "History", "ServiceControl", "decide"]

Action = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class Decision:
    """What the core wants for one service, and the reasons in words (for logs and status).

    ``current`` and ``desired`` are None only when the replica count could not be read; the
    action is then "hold". ``recommended`` is this cycle's raw recommendation before
    stabilisation, cooldowns, step limits and the host guard (None when none was made).
    """

    service: str
    current: int | None
    desired: int | None
    action: Action
    reasons: tuple[str, ...]
    emergency: bool = False
    recommended: int | None = None


@dataclass(frozen=True)
class ServiceControl:
    """An operator's runtime override for one service (issue 5's pause and pin).

    ``paused``: hold whatever count the service has. ``pinned``: target exactly this count at
    once, ignoring the policy's bounds, windows, cooldowns, steps and the host guard: the operator
    asked for it. Pause wins over pin.
    """

    paused: bool = False
    pinned: int | None = None
    note: str = ""  # who/why, appended to the reason

    def __post_init__(self) -> None:
        if self.pinned is not None and self.pinned < 0:
            raise ValueError(f"pinned: {self.pinned} is invalid: must be >= 0")


def _action(current: int, desired: int) -> Action:
    if desired > current:
        return "up"
    if desired < current:
        return "down"
    return "hold"


def _fresh(read_at: float, now: float, stale_after_s: float) -> bool:
    return now - read_at <= stale_after_s


@dataclass(frozen=True)
class _HostState:
    """The host guard's view for this cycle."""

    blocks_up: bool  # no scale-up anywhere (pressure or unknown)
    pressure: bool  # past a limit: the least urgent service may give way
    reason: str


def _host_state(policy: Policy, host: Resources, now: float) -> _HostState:
    lim = policy.host
    if host.cpu_percent is None or host.memory_percent is None:
        missing = "cpu" if host.cpu_percent is None else "memory"
        return _HostState(True, False, f"host {missing} unknown: no scale-up until it is read")
    if not _fresh(host.read_at, now, policy.stale_after_s):
        age = now - host.read_at
        return _HostState(True, False, f"host signals stale ({age:.1f} s old): no scale-up")
    over: list[str] = []
    if host.memory_percent > lim.memory_percent:
        over.append(f"host memory {host.memory_percent:.0f}% > limit {lim.memory_percent:g}%")
    if host.cpu_percent > lim.cpu_percent:
        over.append(f"host cpu {host.cpu_percent:.0f}% > limit {lim.cpu_percent:g}%")
    if over:
        return _HostState(True, True, "; ".join(over))
    return _HostState(False, False, "")


@dataclass(frozen=True)
class _Outcome:
    """One service's decision plus what the host-pressure step needs to know about it."""

    decision: Decision
    history: ServiceHistory
    can_give_way: bool = False  # normal decision, above min, has an idle replica, no cooldown
    idle_replicas: int = 0


def _missing_signals(
    sp: ServicePolicy, so: ServiceObservation, now: float, stale_after_s: float
) -> list[str]:
    out: list[str] = []
    for q in sp.queues:
        sig = so.queues.get(q)
        if sig is None:
            out.append(f"queue {q} not read")
            continue
        if sig.waiting is None:
            out.append(f"queue {q} waiting count missing")
        if sig.in_flight is None:
            out.append(f"queue {q} in-flight count missing")
        if not _fresh(sig.read_at, now, stale_after_s):
            out.append(
                f"queue {q} stale (read {now - sig.read_at:.1f} s ago, limit {stale_after_s:g} s)"
            )
    return out


def _hold(
    service: str, current: int | None, reasons: list[str], history: ServiceHistory
) -> _Outcome:
    return _Outcome(Decision(service, current, current, "hold", tuple(reasons)), history)


def _decide_service(
    name: str,
    sp: ServicePolicy,
    so: ServiceObservation | None,
    sh: ServiceHistory,
    host: _HostState,
    policy: Policy,
    control: ServiceControl | None,
    now: float,
) -> _Outcome:
    current = so.replicas if so is not None else None

    # 1. Operator controls.
    if control is not None and control.paused:
        note = f" ({control.note})" if control.note else ""
        return _hold(name, current, [f"paused by operator{note}: holding"], sh)
    if control is not None and control.pinned is not None:
        if current is None:
            return _hold(name, None, ["pinned, but replica count unknown: holding"], sh)
        note = f" ({control.note})" if control.note else ""
        n = control.pinned
        d = Decision(name, current, n, _action(current, n), (f"pinned to {n} by operator{note}",))
        return _Outcome(d, sh)

    # 2. Needed signals.
    if so is None:
        return _hold(name, None, ["service not observed this cycle: holding"], sh)
    if current is None:
        return _hold(name, None, ["replica count unknown: holding"], sh)
    missing = _missing_signals(sp, so, now, policy.stale_after_s)
    if missing:
        # No recommendation is recorded, and the idle streak is broken: unknown is not idle.
        return _hold(
            name,
            current,
            [f"holding at {current}: " + "; ".join(missing)],
            replace(sh, idle_since=None),
        )

    sigs = [so.queues[q] for q in sp.queues]
    waiting = sum(s.waiting or 0 for s in sigs)
    in_flight = sum(s.in_flight or 0 for s in sigs)
    work = waiting + in_flight
    ages = [s.oldest_age_s for s in sigs if (s.waiting or 0) > 0]
    latency_unknown = any(a is None for a in ages)
    oldest = max((a for a in ages if a is not None), default=None)
    lo, hi = sp.min_replicas, sp.max_replicas
    first_seen = sh.first_seen_at if sh.first_seen_at is not None else now
    idle_since = (sh.idle_since if sh.idle_since is not None else now) if work == 0 else None
    reasons: list[str] = []

    # 3. Recommendation.
    tgt = sp.target
    if tgt.tasks_per_replica is not None:
        raw = math.ceil(work / tgt.tasks_per_replica)
        text = (
            f"work {work} (waiting {waiting}, in flight {in_flight}) / target "
            f"{tgt.tasks_per_replica:g} per replica -> {raw}"
        )
        if current > 0 and raw != current:
            ratio = work / (tgt.tasks_per_replica * current)
            if abs(ratio - 1.0) <= tgt.tolerance:
                raw = current
                text += f"; within tolerance {tgt.tolerance:g} (ratio {ratio:.2f}) -> {current}"
        reasons.append(text)
    elif work == 0:
        raw = 0
        reasons.append("latency target only: no work -> 0")
    else:
        raw = max(current, 1)
        reasons.append(f"latency target only: work {work} remains -> keep {raw}")
    if tgt.latency_s is not None and waiting > 0:
        if latency_unknown:
            raw = max(raw, current)
            reasons.append("age of oldest waiting message unknown: no scale-down")
        elif oldest is not None and oldest > tgt.latency_s and raw <= current:
            raw = current + 1
            reasons.append(
                f"oldest waiting {oldest:.1f} s > objective {tgt.latency_s:g} s -> {raw}"
            )
    w = so.workers
    if waiting > 0 and current > 0 and _fresh(w.read_at, now, policy.stale_after_s):
        lim = sp.resources
        hot: list[str] = []
        if w.cpu_percent is not None and w.cpu_percent > lim.cpu_percent:
            hot.append(f"cpu {w.cpu_percent:.0f}% > limit {lim.cpu_percent:g}%")
        if w.memory_percent is not None and w.memory_percent > lim.memory_percent:
            hot.append(f"memory {w.memory_percent:.0f}% > limit {lim.memory_percent:g}%")
        if hot and raw <= current:
            raw = current + 1
            reasons.append(f"workers saturated ({', '.join(hot)}) with {waiting} waiting -> {raw}")
    rec = min(max(raw, lo), hi)
    if rec > raw:
        reasons.append(f"raised to min {lo}")
    elif rec < raw:
        reasons.append(f"clamped to max {hi}")
    # 4. Stabilisation windows (the recommendation is recorded first: it is part of the window).
    horizon = max(sp.scale_up.stabilization_s, sp.scale_down.stabilization_s)
    recs = (*((t, r) for t, r in sh.recommendations if t >= now - horizon), (now, rec))
    new_sh = replace(sh, recommendations=recs, first_seen_at=first_seen, idle_since=idle_since)
    up_rec = min(r for t, r in recs if t >= now - sp.scale_up.stabilization_s)
    down_rec = max(r for t, r in recs if t >= now - sp.scale_down.stabilization_s)
    desired = current
    if current < up_rec:
        desired = up_rec
    elif current > down_rec:
        desired = down_rec
    if rec > current and desired < rec:
        reasons.append(
            f"up window {sp.scale_up.stabilization_s:g} s: lowest recommendation {up_rec} "
            f"-> {desired}"
        )
    if rec < current and desired > rec:
        reasons.append(
            f"down window {sp.scale_down.stabilization_s:g} s: highest recommendation "
            f"{down_rec} -> {desired}"
        )
    seen_for = now - first_seen
    if desired < current and seen_for < sp.scale_down.stabilization_s:
        desired = current
        reasons.append(
            f"observed for {seen_for:.0f} s only: no scale-down before a full down window "
            f"({sp.scale_down.stabilization_s:g} s)"
        )
    desired = min(max(desired, lo), hi)
    if desired == 0 and current > 0:
        # Zero needs both the down window (all its recommendations 0) and the quiet period.
        idle_for = 0.0 if idle_since is None else now - idle_since
        if idle_for >= sp.scale_to_zero.idle_s:
            reasons.append(f"idle {idle_for:.0f} s >= quiet period {sp.scale_to_zero.idle_s:g} s")
        else:
            desired = 1
            reasons.append(
                f"idle {idle_for:.0f} s of the {sp.scale_to_zero.idle_s:g} s quiet period -> keep 1"
            )

    # 5. Emergency.
    emergency = False
    if sp.emergency is not None:
        e = sp.emergency
        sig = so.queues[e.queue]
        why: list[str] = []
        if e.depth is not None and (sig.waiting or 0) > e.depth:
            why.append(f"depth {sig.waiting} > {e.depth}")
        age = sig.oldest_age_s
        waiting_here = (sig.waiting or 0) > 0
        if e.latency_s is not None and age is not None and waiting_here and age > e.latency_s:
            why.append(f"oldest {age:.1f} s > {e.latency_s:g} s")
        to = min(e.scale_to if e.scale_to is not None else hi, hi)
        if why and max(to, desired) > current:
            emergency = True
            desired = max(to, desired)
            reasons.append(
                f"emergency on queue {e.queue} ({', '.join(why)}): {desired} at once, "
                "past step limit and cooldown"
            )

    # 6. Cooldowns and step limits. Restoring the minimum skips both (the bound is the policy).
    since = sh.since_last_scale(now)
    below_min, above_max = current < lo, current > hi
    if desired > current and not emergency and not below_min:
        if current == 0:
            reasons.append("waking from zero: no cooldown")
        elif since is not None and since < sp.scale_up.cooldown_s:
            reasons.append(
                f"scale-up cooldown: last change {since:.0f} s ago < {sp.scale_up.cooldown_s:g} s"
                f" -> hold {current}"
            )
            desired = current
    cooling = since is not None and since < sp.scale_down.cooldown_s
    if desired < current and not above_max and cooling:
        reasons.append(
            f"scale-down cooldown: last change {since:.0f} s ago < "
            f"{sp.scale_down.cooldown_s:g} s -> hold {current}"
        )
        desired = current
    if desired > current and not emergency:
        step = sp.scale_up.step_limit(current)
        if step is not None and desired - current > step:
            desired = max(current + step, min(lo, desired))
            reasons.append(f"step limit +{step} -> {desired}")
    elif desired < current:
        step = sp.scale_down.step_limit(current)
        if step is not None and current - desired > step:
            desired = min(current - step, max(hi, desired))
            reasons.append(f"step limit -{step} -> {desired}")

    # 7a. Host guard on scale-up (the minimum is restored regardless: it is the policy's floor).
    if desired > current and host.blocks_up:
        allowed = max(current, min(desired, lo))
        reasons.append(f"{host.reason}: no scale-up (would be {desired}) -> {allowed}")
        desired = allowed

    idle = so.busy_replicas
    idle_replicas = current - idle if idle is not None else max(0, current - work)
    decision = Decision(
        name, current, desired, _action(current, desired), tuple(reasons), emergency, rec
    )
    return _Outcome(
        decision,
        new_sh,
        can_give_way=desired == current and current > lo and idle_replicas > 0 and not cooling,
        idle_replicas=idle_replicas,
    )


def decide(
    policy: Policy,
    obs: Observations,
    history: History,
    now: float,
    controls: Mapping[str, ServiceControl] | None = None,
) -> tuple[dict[str, Decision], History]:
    """Decide every policy service's desired replicas for this cycle.

    Returns the decisions and the history updated with what was *observed* (recommendations,
    idleness). It does not assume the decisions are carried out: after acting, the caller must
    call ``History.record_action(service, before, after, now)`` with the count the backend
    actually reached, which starts the cooldowns. ``controls`` holds operator pause/pin overrides.
    """
    controls = controls or {}
    host = _host_state(policy, obs.host, now)
    outcomes: dict[str, _Outcome] = {}
    for name, sp in policy.services.items():
        outcomes[name] = _decide_service(
            name,
            sp,
            obs.services.get(name),
            history.get(name),
            host,
            policy,
            controls.get(name),
            now,
        )

    # 7b. Under host pressure, the least urgent service with an idle replica gives one up, unless
    # some service is already scaling down this cycle (that relieves the host too).
    if host.pressure and not any(o.decision.action == "down" for o in outcomes.values()):
        candidates = [n for n, o in outcomes.items() if o.can_give_way]
        if candidates:
            chosen = min(
                candidates,
                key=lambda n: (policy.services[n].urgency, -outcomes[n].idle_replicas, n),
            )
            o = outcomes[chosen]
            cur = o.decision.current
            assert cur is not None  # can_give_way implies a known count
            why = (
                f"{host.reason}: least urgent (urgency {policy.services[chosen].urgency}) "
                f"gives way, {o.idle_replicas} idle -> {cur - 1}"
            )
            outcomes[chosen] = replace(
                o,
                decision=replace(
                    o.decision,
                    desired=cur - 1,
                    action="down",
                    reasons=(*o.decision.reasons, why),
                ),
            )

    new_history = History({**history.services, **{n: o.history for n, o in outcomes.items()}})
    return {n: o.decision for n, o in outcomes.items()}, new_history
