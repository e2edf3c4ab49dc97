"""The decision core: (policy, observations, history, now) -> desired replicas and why, per service.

Pure: no I/O and no clock reads (``now`` is a parameter, a monotonic time in the running scaler),
so every rule is testable as a table case, as a property, and over time in the simulator
(``scaler.simulate``). Each step below is one named function, in the order docs/scaler-policy.md
describes them (the way Kubernetes' HPA names ``stabilizeRecommendationWithBehaviors`` and
``convertDesiredReplicasWithBehaviorRate`` beside its replica calculator):

1. ``apply_operator_control``: a paused service holds; a pinned one targets its pinned count;
2. ``hold_on_missing_signals``: hold when the replica count or a queue signal is missing or stale;
3. ``recommend``: from the backlog per replica, the latency objective and saturated workers,
   clamped to [min, max];
4. ``emergency_floor`` then ``stabilize``: a standing emergency's count joins the recommendation
   that is remembered; up to the lowest recommendation in the up window, down to the highest in
   the down window; ``keep_for_quiet_period`` keeps one replica until a min-0 service has been
   idle for its quiet period;
5. ``apply_emergency``: a queue past its depth or age threshold jumps to ``scale_to`` at once;
6. ``pace``: cooldowns, then step limits (an emergency and restoring the minimum skip both);
7. ``guard_host``: no scale-up while host CPU or memory is past its limit (or unknown), except
   back to the minimum or to one consumer for work waiting at zero;
8. ``plan_warm_pool``: the warm pool's size beside the serving count (within max_replicas, not
   refilled while the host guard blocks, released under host pressure or, by choice, at zero);
   then, across services, ``give_way_under_pressure``: unless a service scales down or releases
   warm replicas this cycle, the least urgent service with an idle replica gives one up.

The caller acts on the decisions and then records what it actually achieved with
``History.record_action`` (see ``scaler.history``): decide() never assumes its advice was followed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from scaler.history import History, ServiceHistory
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation
from scaler.policy import Policy, ServicePolicy

__all__ = ["Decision", "History", "ServiceControl", "decide", "queue_totals"]

Action = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class Decision:
    """What the core wants for one service, and the reasons in words (for logs and status).

    ``current`` and ``desired`` are None only when the replica count could not be read; the
    action is then "hold". ``recommended`` is this cycle's recommendation as remembered for the
    stabilisation windows (a standing emergency's count included), before the windows,
    cooldowns, step limits and the host guard (None when none was made). ``warm_current`` and
    ``warm`` are the warm pool's size as observed and as wanted (serving counts exclude it).
    """

    service: str
    current: int | None
    desired: int | None
    action: Action
    reasons: tuple[str, ...]
    emergency: bool = False
    recommended: int | None = None
    warm_current: int = 0
    warm: int = 0


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
class HostState:
    """The host guard's view for this cycle."""

    blocks_up: bool  # no scale-up anywhere (pressure or unknown)
    pressure: bool  # past a limit: the least urgent service may give way
    reason: str


def read_host(policy: Policy, host: Resources, now: float) -> HostState:
    """Whether the host allows scale-up this cycle, and whether it is under pressure."""
    lim = policy.host
    if host.cpu_percent is None or host.memory_percent is None:
        missing = "cpu" if host.cpu_percent is None else "memory"
        return HostState(True, False, f"host {missing} unknown: no scale-up until it is read")
    if not _fresh(host.read_at, now, policy.stale_after_s):
        age = now - host.read_at
        return HostState(True, False, f"host signals stale ({age:.1f} s old): no scale-up")
    over: list[str] = []
    if host.memory_percent > lim.memory_percent:
        over.append(f"host memory {host.memory_percent:.0f}% > limit {lim.memory_percent:g}%")
    if host.cpu_percent > lim.cpu_percent:
        over.append(f"host cpu {host.cpu_percent:.0f}% > limit {lim.cpu_percent:g}%")
    if over:
        return HostState(True, True, "; ".join(over))
    return HostState(False, False, "")


@dataclass(frozen=True)
class Load:
    """One service's signals, summed over its queues (every one of them read and fresh)."""

    waiting: int
    in_flight: int
    oldest_age_s: float | None  # oldest waiting message over the queues; None if none known
    age_unknown: bool  # some queue has messages waiting whose age could not be read
    busy_replicas: int | None

    @property
    def work(self) -> int:
        return self.waiting + self.in_flight


@dataclass(frozen=True)
class _Outcome:
    """One service's decision plus what the host-pressure step needs to know about it."""

    decision: Decision
    history: ServiceHistory
    can_give_way: bool = False  # normal decision, above its floor, has an idle replica, no cooldown
    idle_replicas: int = 0


def _hold(
    service: str,
    current: int | None,
    reasons: list[str],
    history: ServiceHistory,
    warm: int = 0,
) -> _Outcome:
    d = Decision(service, current, current, "hold", tuple(reasons), warm_current=warm, warm=warm)
    return _Outcome(d, history)


# --- 1. operator controls ----------------------------------------------------------------------


def apply_operator_control(
    name: str,
    sp: ServicePolicy,
    current: int | None,
    warm_now: int,
    control: ServiceControl | None,
    host: HostState,
    sh: ServiceHistory,
) -> _Outcome | None:
    """Pause holds (its warm pool too), pin targets its count at once (the warm pool then
    follows the policy beside it); None when no override applies."""
    if control is None:
        return None
    note = f" ({control.note})" if control.note else ""
    if control.paused:
        return _hold(name, current, [f"paused by operator{note}: holding"], sh, warm_now)
    if control.pinned is None:
        return None
    if current is None:
        return _hold(name, None, ["pinned, but replica count unknown: holding"], sh, warm_now)
    n = control.pinned
    reasons = [f"pinned to {n} by operator{note}"]
    warm = plan_warm_pool(sp, n, warm_now, host, reasons)
    d = Decision(
        name, current, n, _action(current, n), tuple(reasons), warm_current=warm_now, warm=warm
    )
    return _Outcome(d, sh)


# --- 2. signals ---------------------------------------------------------------------------------


def missing_signals(
    sp: ServicePolicy, so: ServiceObservation, now: float, stale_after_s: float
) -> list[str]:
    """Every queue signal the service needs but does not have fresh, in words."""
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


def hold_on_missing_signals(
    name: str,
    sp: ServicePolicy,
    so: ServiceObservation | None,
    sh: ServiceHistory,
    policy: Policy,
    now: float,
) -> _Outcome | None:
    """Hold (and break the idle streak: unknown is not idle) when a needed signal is missing."""
    if so is None:
        return _hold(name, None, ["service not observed this cycle: holding"], sh)
    if so.replicas is None:
        return _hold(name, None, ["replica count unknown: holding"], sh, so.warm)
    missing = missing_signals(sp, so, now, policy.stale_after_s)
    if missing:
        return _hold(
            name,
            so.replicas,
            [f"holding at {so.replicas}: " + "; ".join(missing)],
            replace(sh, idle_since=None),
            so.warm,
        )
    return None


def queue_totals(signals: Iterable[QueueSignal]) -> tuple[int, int]:
    """A service's messages waiting and in flight over all its queues (an unknown count as 0):
    the one sum the decision, the loop's arming and the simulator all use."""
    waiting = in_flight = 0
    for s in signals:
        waiting += s.waiting or 0
        in_flight += s.in_flight or 0
    return waiting, in_flight


def summarise_load(sp: ServicePolicy, so: ServiceObservation) -> Load:
    """The service's queues as one load (only called once every signal is known)."""
    sigs = [so.queues[q] for q in sp.queues]
    ages = [s.oldest_age_s for s in sigs if (s.waiting or 0) > 0]
    waiting, in_flight = queue_totals(sigs)
    return Load(
        waiting=waiting,
        in_flight=in_flight,
        oldest_age_s=max((a for a in ages if a is not None), default=None),
        age_unknown=any(a is None for a in ages),
        busy_replicas=so.busy_replicas,
    )


# --- 3. recommendation --------------------------------------------------------------------------


def within_band(tpr: float, tolerance: float, work: int, current: int) -> bool:
    """Is work / (tasks_per_replica x current) within 1 +/- tolerance (no change)? Shared with
    the arming rule, so that its ring level agrees with the depth rule to the message."""
    return current > 0 and abs(work / (tpr * current) - 1.0) <= tolerance


def depth_count(tpr: float, tolerance: float, work: int, current: int) -> int:
    """The depth rule alone: ceil(work / tasks_per_replica), or ``current`` within the band."""
    raw = math.ceil(work / tpr)
    return current if raw != current and within_band(tpr, tolerance, work, current) else raw


def recommend_from_backlog(sp: ServicePolicy, load: Load, current: int, reasons: list[str]) -> int:
    """ceil(work / tasks_per_replica) with the tolerance band; or, latency-only, what is busy."""
    tgt = sp.target
    work = load.work
    if tgt.tasks_per_replica is not None:
        raw = math.ceil(work / tgt.tasks_per_replica)
        text = (
            f"work {work} (waiting {load.waiting}, in flight {load.in_flight}) / target "
            f"{tgt.tasks_per_replica:g} per replica -> {raw}"
        )
        if raw != current and within_band(tgt.tasks_per_replica, tgt.tolerance, work, current):
            ratio = work / (tgt.tasks_per_replica * current)
            raw = current
            text += f"; within tolerance {tgt.tolerance:g} (ratio {ratio:.2f}) -> {current}"
        reasons.append(text)
        return raw
    # Latency only: the objective decides growth (recommend_for_latency); with nothing waiting
    # the objective is met, and only the replicas running tasks are needed.
    if work == 0:
        reasons.append("latency target only: no work -> 0")
        return 0
    if load.waiting > 0:
        raw = max(current, 1)
        reasons.append(f"latency target only: {load.waiting} waiting -> keep {raw}")
        return raw
    busy = load.busy_replicas if load.busy_replicas is not None else load.in_flight
    raw = max(1, min(current, busy)) if current > 0 else 1
    reasons.append(
        f"latency target only: nothing waiting, {load.in_flight} in flight on "
        f"{'busy replicas' if load.busy_replicas is not None else 'at most as many replicas'} "
        f"-> {raw}"
    )
    return raw


def recommend_for_latency(
    sp: ServicePolicy, load: Load, current: int, raw: int, reasons: list[str]
) -> int:
    """A breached objective adds a replica; one near breach (over half) blocks scale-down.

    The half-objective band is hysteresis: without it a latency-bound service sheds the replica
    that kept it under the objective, breaches, adds it back, and oscillates under steady load.
    """
    objective = sp.target.latency_s
    if objective is None or load.waiting == 0:
        return raw
    if load.age_unknown:
        if raw < current:
            reasons.append("age of oldest waiting message unknown: no scale-down")
        return max(raw, current)
    oldest = load.oldest_age_s
    if oldest is None:
        return raw
    if oldest > objective and raw <= current:
        reasons.append(
            f"oldest waiting {oldest:.1f} s > objective {objective:g} s -> {current + 1}"
        )
        return current + 1
    if oldest > objective / 2 and raw < current:
        reasons.append(
            f"oldest waiting {oldest:.1f} s > half the objective ({objective / 2:g} s): "
            f"no scale-down -> {current}"
        )
        return current
    return raw


def recommend_for_saturation(
    sp: ServicePolicy,
    so: ServiceObservation,
    load: Load,
    current: int,
    raw: int,
    policy: Policy,
    now: float,
    reasons: list[str],
) -> int:
    """Workers over their CPU or memory limit with work waiting: at least one more replica."""
    w = so.workers
    if load.waiting == 0 or current == 0 or not _fresh(w.read_at, now, policy.stale_after_s):
        return raw
    lim = sp.resources
    hot: list[str] = []
    if w.cpu_percent is not None and w.cpu_percent > lim.cpu_percent:
        hot.append(f"cpu {w.cpu_percent:.0f}% > limit {lim.cpu_percent:g}%")
    if w.memory_percent is not None and w.memory_percent > lim.memory_percent:
        hot.append(f"memory {w.memory_percent:.0f}% > limit {lim.memory_percent:g}%")
    if hot and raw <= current:
        reasons.append(
            f"workers saturated ({', '.join(hot)}) with {load.waiting} waiting -> {current + 1}"
        )
        return current + 1
    return raw


def clamp_to_bounds(sp: ServicePolicy, raw: int, reasons: list[str]) -> int:
    """The recommendation within [min_replicas, max_replicas]."""
    lo, hi = sp.min_replicas, sp.max_replicas
    rec = min(max(raw, lo), hi)
    if rec > raw:
        reasons.append(f"raised to min {lo}")
    elif rec < raw:
        reasons.append(f"clamped to max {hi}")
    return rec


def recommend(
    sp: ServicePolicy,
    so: ServiceObservation,
    load: Load,
    current: int,
    policy: Policy,
    now: float,
    reasons: list[str],
) -> int:
    """This cycle's recommendation, before any memory of earlier cycles."""
    raw = recommend_from_backlog(sp, load, current, reasons)
    raw = recommend_for_latency(sp, load, current, raw, reasons)
    raw = recommend_for_saturation(sp, so, load, current, raw, policy, now, reasons)
    return clamp_to_bounds(sp, raw, reasons)


# --- 4. emergency floor and stabilisation -------------------------------------------------------


@dataclass(frozen=True)
class Emergency:
    """A standing emergency: the count it asks for and why, in words."""

    scale_to: int
    why: str


def emergency_floor(sp: ServicePolicy, so: ServiceObservation) -> Emergency | None:
    """The emergency queue past its depth or age threshold, whatever the current count."""
    e = sp.emergency
    if e is None:
        return None
    sig = so.queues[e.queue]
    waiting = sig.waiting or 0
    why: list[str] = []
    if e.depth is not None and waiting > e.depth:
        why.append(f"depth {sig.waiting} > {e.depth}")
    age = sig.oldest_age_s
    if e.latency_s is not None and age is not None and waiting > 0 and age > e.latency_s:
        why.append(f"oldest {age:.1f} s > {e.latency_s:g} s")
    if not why:
        return None
    hi = sp.max_replicas
    to = min(e.scale_to if e.scale_to is not None else hi, hi)
    return Emergency(to, f"emergency on queue {e.queue} ({', '.join(why)})")


def stabilize(
    sp: ServicePolicy,
    sh: ServiceHistory,
    rec: int,
    current: int,
    now: float,
    reasons: list[str],
) -> tuple[int, tuple[tuple[float, int], ...]]:
    """Up to the lowest recommendation in the up window, down to the highest in the down window.

    The recommendation is remembered first (it is part of its own window). A scaler that has not
    watched the service for one full down window does not scale it down: its memory is empty.
    Returns the stabilised count and the pruned memory: entries older than both windows go, and
    so does an older entry equal to this one (the newer stays in every window longer, so it
    decides the same minimum and maximum), which keeps a steady service's memory short.
    """
    up_s, down_s = sp.scale_up.stabilization_s, sp.scale_down.stabilization_s
    oldest = now - max(up_s, down_s)
    up_from, down_from = now - up_s, now - down_s
    up_rec = down_rec = rec
    kept: list[tuple[float, int]] = []
    for t, r in sh.recommendations:
        if t < oldest or r == rec:
            continue
        kept.append((t, r))
        if t >= up_from and r < up_rec:
            up_rec = r
        if t >= down_from and r > down_rec:
            down_rec = r
    kept.append((now, rec))
    recs = tuple(kept)
    desired = current
    if current < up_rec:
        desired = up_rec
    elif current > down_rec:
        desired = down_rec
    if rec > current and desired < rec:
        reasons.append(f"up window {up_s:g} s: lowest recommendation {up_rec} -> {desired}")
    if rec < current and desired > rec:
        reasons.append(f"down window {down_s:g} s: highest recommendation {down_rec} -> {desired}")
    first_seen = sh.first_seen_at if sh.first_seen_at is not None else now
    seen_for = now - first_seen
    if desired < current and seen_for < down_s:
        reasons.append(
            f"observed for {seen_for:.0f} s only: no scale-down before a full down window "
            f"({down_s:g} s)"
        )
        desired = current
    return min(max(desired, sp.min_replicas), sp.max_replicas), recs


def keep_for_quiet_period(
    sp: ServicePolicy,
    desired: int,
    current: int,
    idle_since: float | None,
    now: float,
    reasons: list[str],
) -> int:
    """Zero needs the down window (all zeros) and the quiet period; until then keep one."""
    if desired != 0 or current == 0:
        return desired
    idle_for = 0.0 if idle_since is None else now - idle_since
    quiet = sp.scale_to_zero.idle_s
    if idle_for >= quiet:
        reasons.append(f"idle {idle_for:.0f} s >= quiet period {quiet:g} s")
        return 0
    reasons.append(f"idle {idle_for:.0f} s of the {quiet:g} s quiet period -> keep 1")
    return 1


# --- 5. emergency -------------------------------------------------------------------------------


def apply_emergency(
    emergency: Emergency | None, desired: int, current: int, reasons: list[str]
) -> tuple[int, bool]:
    """Jump to the emergency count at once; True when that raised the count."""
    if emergency is None or max(emergency.scale_to, desired) <= current:
        return desired, False
    desired = max(emergency.scale_to, desired)
    reasons.append(f"{emergency.why}: {desired} at once, past step limit and cooldown")
    return desired, True


# --- 6. pace: cooldowns and step limits ---------------------------------------------------------


def apply_cooldowns(
    sp: ServicePolicy,
    sh: ServiceHistory,
    desired: int,
    current: int,
    emergency: bool,
    now: float,
    reasons: list[str],
) -> int:
    """No change in a direction within its cooldown of the last carried-out change.

    Skipped by an emergency, by waking from zero and by restoring the bounds (the policy's).
    """
    since = sh.since_last_scale(now)
    lo, hi = sp.min_replicas, sp.max_replicas
    if desired > current and not emergency and current >= lo:
        if current == 0:
            reasons.append("waking from zero: no cooldown")
        elif since is not None and since < sp.scale_up.cooldown_s:
            reasons.append(
                f"scale-up cooldown: last change {since:.0f} s ago < {sp.scale_up.cooldown_s:g} s"
                f" -> hold {current}"
            )
            return current
    cooling = since is not None and since < sp.scale_down.cooldown_s
    if desired < current and current <= hi and cooling:
        reasons.append(
            f"scale-down cooldown: last change {since:.0f} s ago < "
            f"{sp.scale_down.cooldown_s:g} s -> hold {current}"
        )
        return current
    return desired


def limit_step(
    sp: ServicePolicy, desired: int, current: int, emergency: bool, reasons: list[str]
) -> int:
    """At most one step per action in each direction (the minimum and maximum still apply)."""
    lo, hi = sp.min_replicas, sp.max_replicas
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
    return desired


def pace(
    sp: ServicePolicy,
    sh: ServiceHistory,
    desired: int,
    current: int,
    emergency: bool,
    now: float,
    reasons: list[str],
) -> int:
    """Cooldowns, then step limits."""
    desired = apply_cooldowns(sp, sh, desired, current, emergency, now, reasons)
    return limit_step(sp, desired, current, emergency, reasons)


# --- 7. host guard ------------------------------------------------------------------------------


def guard_host(
    sp: ServicePolicy,
    host: HostState,
    load: Load,
    desired: int,
    current: int,
    reasons: list[str],
) -> int:
    """No scale-up while the host is past a limit or unknown, with two floors that always hold.

    The minimum is the policy's floor; and a queue with work waiting always gets one consumer,
    or a ``min_replicas: 0`` service would starve behind a busy host for as long as it stays busy.
    """
    if desired <= current or not host.blocks_up:
        return desired
    floor = max(sp.min_replicas, 1 if load.waiting > 0 else 0)
    allowed = max(current, min(desired, floor))
    reasons.append(f"{host.reason}: no scale-up (would be {desired}) -> {allowed}")
    return allowed


# --- 8. warm pool ------------------------------------------------------------------------------


def plan_warm_pool(
    sp: ServicePolicy, desired: int, warm_now: int, host: HostState, reasons: list[str]
) -> int:
    """How many warm replicas (booted, consuming nothing) to keep beside ``desired`` serving.

    The policy's ``warm``, within max_replicas together with the serving ones; none at zero
    unless ``warm_at_zero``. Refilling starts containers, so it waits while the host guard
    blocks scale-up; under host pressure the pool is released first: it is not capacity.
    """
    if sp.warm == 0:
        if warm_now:
            reasons.append(f"no warm pool in the policy: {warm_now} warm -> 0")
        return 0
    if desired == 0 and not sp.warm_at_zero:
        if warm_now:
            reasons.append(f"at zero and warm_at_zero is false: warm pool {warm_now} -> 0")
        return 0
    target = max(0, min(sp.warm, sp.max_replicas - desired))
    if target < sp.warm and target != warm_now:
        reasons.append(
            f"warm pool {target} of {sp.warm}: serving {desired} + warm within max "
            f"{sp.max_replicas}"
        )
    if host.pressure and warm_now:
        reasons.append(f"{host.reason}: warm pool released ({warm_now} -> 0)")
        return 0
    if target > warm_now and host.blocks_up:
        reasons.append(f"{host.reason}: warm pool not refilled (would be {target}) -> {warm_now}")
        return warm_now
    if target > warm_now:
        reasons.append(f"warm pool refilled {warm_now} -> {target}")
    return target


def give_way_under_pressure(
    policy: Policy, host: HostState, outcomes: dict[str, _Outcome]
) -> dict[str, _Outcome]:
    """Under host pressure the least urgent service with an idle replica gives one up.

    Not when some service already scales down or releases warm replicas this cycle (that
    relieves the host too). Never the last replica: a service goes to zero only through its
    quiet period.
    """
    relieving = any(
        o.decision.action == "down" or o.decision.warm < o.decision.warm_current
        for o in outcomes.values()
    )
    if not host.pressure or relieving:
        return outcomes
    candidates = [n for n, o in outcomes.items() if o.can_give_way]
    if not candidates:
        return outcomes
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
    decision = replace(
        o.decision, desired=cur - 1, action="down", reasons=(*o.decision.reasons, why)
    )
    return {**outcomes, chosen: replace(o, decision=decision)}


# --- one service, then all ----------------------------------------------------------------------


def _decide_service(
    name: str,
    sp: ServicePolicy,
    so: ServiceObservation | None,
    sh: ServiceHistory,
    host: HostState,
    policy: Policy,
    control: ServiceControl | None,
    now: float,
) -> _Outcome:
    current = so.replicas if so is not None else None
    warm_now = so.warm if so is not None else 0
    early = apply_operator_control(name, sp, current, warm_now, control, host, sh)
    early = early or hold_on_missing_signals(name, sp, so, sh, policy, now)
    if early is not None:
        # Work the core could not see (unknown, paused, pinned) is not idle time: the quiet
        # period starts again from the first normal decision that finds nothing to do.
        return replace(early, history=replace(early.history, idle_since=None))
    assert so is not None and so.replicas is not None  # hold_on_missing_signals checked
    current = so.replicas
    load = summarise_load(sp, so)
    reasons: list[str] = []

    rec = recommend(sp, so, load, current, policy, now, reasons)
    emergency = emergency_floor(sp, so)
    if emergency is not None and emergency.scale_to > rec:
        # Remembered, so the down window holds the emergency's count while the condition
        # stands and for one window after: no step down and jump back up under a standing flood.
        rec = emergency.scale_to
    desired, recs = stabilize(sp, sh, rec, current, now, reasons)
    idle_since = (sh.idle_since if sh.idle_since is not None else now) if load.work == 0 else None
    desired = keep_for_quiet_period(sp, desired, current, idle_since, now, reasons)
    desired, jumped = apply_emergency(emergency, desired, current, reasons)
    desired = pace(sp, sh, desired, current, jumped, now, reasons)
    desired = guard_host(sp, host, load, desired, current, reasons)
    warm = plan_warm_pool(sp, desired, warm_now, host, reasons)

    new_sh = replace(
        sh,
        recommendations=recs,
        first_seen_at=sh.first_seen_at if sh.first_seen_at is not None else now,
        idle_since=idle_since,
    )
    busy = load.busy_replicas
    idle_replicas = current - busy if busy is not None else max(0, current - load.work)
    since = sh.since_last_scale(now)
    cooling = since is not None and since < sp.scale_down.cooldown_s
    decision = Decision(
        name, current, desired, _action(current, desired), tuple(reasons), jumped, rec,
        warm_current=warm_now, warm=warm,
    )  # fmt: skip
    floor = max(sp.min_replicas, 1)
    return _Outcome(
        decision,
        new_sh,
        can_give_way=desired == current > floor and idle_replicas > 0 and not cooling,
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
    ``now`` and every signal's ``read_at`` are on one clock (monotonic in the running scaler).
    """
    controls = controls or {}
    host = read_host(policy, obs.host, now)
    outcomes = {
        name: _decide_service(
            name, sp, obs.services.get(name), history.get(name), host, policy,
            controls.get(name), now,
        )
        for name, sp in policy.services.items()
    }  # fmt: skip
    outcomes = give_way_under_pressure(policy, host, outcomes)
    new_history = History({**history.services, **{n: o.history for n, o in outcomes.items()}})
    return {n: o.decision for n, o in outcomes.items()}, new_history
