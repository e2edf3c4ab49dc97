"""Properties of the decision core that must hold for any policy, observation and history.

Hypothesis generates policies and signals; sequences of cycles are simulated with a backend that
sometimes fails to act, and every rule (bounds, windows, cooldowns, steps) is checked on every
decision. No services: the core is pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaler.decide import Decision, decide
from scaler.history import History, ServiceHistory
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation
from scaler.policy import Policy, ServicePolicy, parse_policy

SVC = "worker-x"
Q = "x"
NOW = 50_000.0
PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    lo = draw(st.integers(0, 5))
    hi = draw(st.integers(max(lo, 1), 12))
    rule = {
        "stabilization_s": draw(st.sampled_from([0, 5, 30])),
        "cooldown_s": draw(st.sampled_from([0, 3, 10])),
        "max_step": draw(st.one_of(st.none(), st.integers(1, 4))),
        "max_step_percent": draw(st.one_of(st.none(), st.sampled_from([25, 100]))),
    }
    down = {
        "stabilization_s": draw(st.sampled_from([0, 10, 60])),
        "cooldown_s": draw(st.sampled_from([0, 5, 20])),
        "max_step": draw(st.one_of(st.none(), st.integers(1, 3))),
    }
    target: dict[str, Any] = {
        "tasks_per_replica": draw(st.sampled_from([1, 5, 20])),
        "tolerance": draw(st.sampled_from([0, 0.1, 0.3])),
    }
    if draw(st.booleans()):
        target["latency_s"] = draw(st.sampled_from([2, 10]))
    body: dict[str, Any] = {
        "queues": [Q],
        "min_replicas": lo,
        "max_replicas": hi,
        "target": target,
        "scale_up": rule,
        "scale_down": down,
        "scale_to_zero": {"idle_s": draw(st.sampled_from([0, 20]))},
    }
    if draw(st.booleans()):
        body["emergency"] = {"queue": Q, "depth": draw(st.sampled_from([10, 100]))}
    return parse_policy({"services": {SVC: body}}, env={})


def obs_of(
    replicas: int | None,
    waiting: int | None,
    in_flight: int | None,
    oldest: float | None,
    now: float,
    *,
    read_at: float | None = None,
    host: Resources | None = None,
    workers_cpu: float = 10.0,
) -> Observations:
    sig = QueueSignal(Q, waiting, in_flight, oldest, read_at=now if read_at is None else read_at)
    so = ServiceObservation(SVC, replicas, {Q: sig}, Resources(workers_cpu, 10.0, now))
    return Observations(now, {SVC: so}, host or Resources(10.0, 10.0, now))


@st.composite
def histories(draw: st.DrawFn) -> History:
    recs = draw(
        st.lists(st.tuples(st.floats(0, 120), st.integers(0, 12)), max_size=6).map(
            lambda xs: tuple(sorted((NOW - age, r) for age, r in xs))
        )
    )
    last = draw(st.one_of(st.none(), st.floats(0, 60)))
    idle = draw(st.one_of(st.none(), st.floats(0, 60)))
    first = draw(st.one_of(st.none(), st.floats(0, 200)))
    return History(
        {
            SVC: ServiceHistory(
                recommendations=recs,
                first_seen_at=None if first is None else NOW - first,
                idle_since=None if idle is None else NOW - idle,
                last_scale_at=None if last is None else NOW - last,
                last_direction=None if last is None else "up",
            )
        }
    )


hosts = st.builds(
    Resources,
    st.one_of(st.none(), st.floats(0, 100)),
    st.one_of(st.none(), st.floats(0, 100)),
    st.just(NOW),
)


def _decide_one(policy: Policy, obs: Observations, hist: History, now: float = NOW) -> Decision:
    decisions, _ = decide(policy, obs, hist, now)
    return decisions[SVC]


@PROFILE
@given(
    policy=policies(),
    hist=histories(),
    replicas=st.integers(0, 15),
    waiting=st.integers(0, 400),
    in_flight=st.integers(0, 50),
    oldest=st.one_of(st.none(), st.floats(0, 60)),
    host=hosts,
    cpu=st.floats(0, 100),
)
def test_desired_is_always_within_min_and_max(
    policy: Policy,
    hist: History,
    replicas: int,
    waiting: int,
    in_flight: int,
    oldest: float | None,
    host: Resources,
    cpu: float,
) -> None:
    sp = policy.services[SVC]
    obs = obs_of(replicas, waiting, in_flight, oldest, NOW, host=host, workers_cpu=cpu)
    d = _decide_one(policy, obs, hist)
    assert d.desired is not None
    assert sp.min_replicas <= d.desired <= sp.max_replicas, d.reasons
    assert d.action == (
        "up" if d.desired > replicas else "down" if d.desired < replicas else "hold"
    )
    assert d.reasons, "every decision says why"


@PROFILE
@given(
    policy=policies(),
    hist=histories(),
    replicas=st.integers(0, 15),
    waiting=st.one_of(st.none(), st.integers(0, 400)),
    in_flight=st.one_of(st.none(), st.integers(0, 50)),
    stale_by=st.floats(0, 100),
)
def test_never_scales_on_missing_or_stale_data(
    policy: Policy,
    hist: History,
    replicas: int,
    waiting: int | None,
    in_flight: int | None,
    stale_by: float,
) -> None:
    read_at = NOW - policy.stale_after_s - stale_by - 0.001
    if waiting is not None and in_flight is not None:
        obs = obs_of(replicas, waiting, in_flight, None, NOW, read_at=read_at)
    else:
        obs = obs_of(replicas, waiting, in_flight, None, NOW)
    d = _decide_one(policy, obs, hist)
    assert (d.desired, d.action) == (replicas, "hold"), d.reasons
    # Unknown replica count: hold, with nothing to scale from.
    d = _decide_one(policy, obs_of(None, 999, 0, 1.0, NOW), hist)
    assert (d.current, d.desired, d.action) == (None, None, "hold")


@PROFILE
@given(
    policy=policies(),
    hist=histories(),
    replicas=st.integers(0, 15),
    w1=st.integers(0, 400),
    extra=st.integers(0, 400),
    in_flight=st.integers(0, 50),
    more_in_flight=st.integers(0, 50),
    oldest=st.one_of(st.none(), st.floats(0, 60)),
    host=hosts,
)
def test_more_work_never_gives_fewer_replicas(
    policy: Policy,
    hist: History,
    replicas: int,
    w1: int,
    extra: int,
    in_flight: int,
    more_in_flight: int,
    oldest: float | None,
    host: Resources,
) -> None:
    less = _decide_one(policy, obs_of(replicas, w1, in_flight, oldest, NOW, host=host), hist)
    more_obs = obs_of(replicas, w1 + extra, in_flight + more_in_flight, oldest, NOW, host=host)
    more = _decide_one(policy, more_obs, hist)
    assert less.desired is not None and more.desired is not None
    assert more.desired >= less.desired, (less.reasons, more.reasons)


@dataclass
class Cycle:
    """One simulated cycle, for checking the rules after the fact."""

    now: float
    decision: Decision
    history_before: ServiceHistory


def _simulate(
    policy: Policy, loads: list[tuple[float, int, int, bool]], start: int
) -> tuple[list[Cycle], list[tuple[float, int, int]]]:
    """Run the core over a load sequence; the backend fails when told to. Returns the cycles and
    the actions actually carried out (time, before, after)."""
    hist = History()
    replicas = start
    now = NOW
    cycles: list[Cycle] = []
    actions: list[tuple[float, int, int]] = []
    for dt, waiting, in_flight, fails in loads:
        now += dt
        obs = obs_of(replicas, waiting, in_flight, 1.0 if waiting else None, now)
        before = hist.get(SVC)
        decisions, hist = decide(policy, obs, hist, now)
        d = decisions[SVC]
        cycles.append(Cycle(now, d, before))
        assert d.desired is not None
        if d.desired != replicas and not fails:
            hist = hist.record_action(SVC, replicas, d.desired, now)
            actions.append((now, replicas, d.desired))
            replicas = d.desired
    return cycles, actions


@st.composite
def load_sequences(draw: st.DrawFn) -> list[tuple[float, int, int, bool]]:
    """Bursts and quiet spells, with the backend failing about one action in five."""
    out: list[tuple[float, int, int, bool]] = []
    for _ in range(draw(st.integers(1, 6))):
        waiting = draw(st.sampled_from([0, 0, 3, 40, 150, 300]))
        in_flight = draw(st.integers(0, 20)) if waiting else draw(st.sampled_from([0, 0, 2]))
        for _ in range(draw(st.integers(1, 15))):
            dt = draw(st.sampled_from([1.0, 2.0, 2.0, 5.0]))
            out.append((dt, waiting, in_flight, draw(st.integers(0, 4)) == 0))
    return out


def _window(cycles: list[Cycle], end: float, span: float) -> list[int]:
    return [
        c.decision.recommended
        for c in cycles
        if c.decision.recommended is not None and end - span <= c.now <= end
    ]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), loads=load_sequences(), start=st.integers(0, 14))
def test_windows_cooldowns_and_steps_hold_over_sequences(
    policy: Policy, loads: list[tuple[float, int, int, bool]], start: int
) -> None:
    sp: ServicePolicy = policy.services[SVC]
    lo, hi = sp.min_replicas, sp.max_replicas
    cycles, actions = _simulate(policy, loads, start)
    first_seen = cycles[0].now
    for i, c in enumerate(cycles):
        d = c.decision
        assert d.current is not None and d.desired is not None
        cur, want = d.current, d.desired
        assert lo <= want <= hi
        # The last action that really happened before this cycle (failed ones do not count).
        done_before = [t for t, _, _ in actions if t < c.now]
        since = c.now - done_before[-1] if done_before else math.inf
        restoring = cur < lo or cur > hi
        if want > cur and not d.emergency and not restoring:
            if cur > 0:
                assert since >= sp.scale_up.cooldown_s, d.reasons
            step = sp.scale_up.step_limit(cur)
            assert step is None or want - cur <= step, d.reasons
            # The up window: never above the lowest recommendation made within it.
            assert want <= min(_window(cycles[: i + 1], c.now, sp.scale_up.stabilization_s))
        if want < cur and not restoring:
            assert since >= sp.scale_down.cooldown_s, d.reasons
            step = sp.scale_down.step_limit(cur)
            assert step is None or cur - want <= step, d.reasons
            assert c.now - first_seen >= sp.scale_down.stabilization_s, d.reasons
            if want > 0:
                # The down window: never below the highest recommendation made within it.
                window = _window(cycles[: i + 1], c.now, sp.scale_down.stabilization_s)
                assert want >= max(window), (window, d.reasons)
            else:
                # Zero only after the quiet period, with nothing waiting or in flight.
                assert lo == 0
                assert loads[i][1] == 0 and loads[i][2] == 0
                idle_since = c.history_before.idle_since
                idle_since = c.now if idle_since is None else idle_since
                assert c.now - idle_since >= sp.scale_to_zero.idle_s
        if d.emergency:
            assert sp.emergency is not None and want > cur


@settings(max_examples=40, deadline=None)
@given(policy=policies(), start=st.integers(0, 14))
def test_a_steady_load_converges_to_its_target(policy: Policy, start: int) -> None:
    """Held long enough, a constant backlog ends at the clamped target (and stays there)."""
    sp = policy.services[SVC]
    tpr = sp.target.tasks_per_replica
    assert tpr is not None
    work = 6 * int(tpr)  # an exact multiple of the target: no dead-band question
    expected = min(max(math.ceil(work / tpr), sp.min_replicas), sp.max_replicas)
    # All of it in flight: nothing waiting, so neither latency nor emergency rules fire.
    loads = [(2.0, 0, work, False)] * 250
    cycles, _ = _simulate(policy, loads, start)
    tail = [c.decision.desired for c in cycles[-10:]]
    assert len(set(tail)) == 1, "settled"
    final = tail[0]
    assert final is not None
    if final != expected:
        # Anything inside the dead band around the target is a legitimate resting place.
        assert sp.min_replicas <= final <= sp.max_replicas
        assert abs(work / (tpr * final) - 1) <= sp.target.tolerance, cycles[-1].decision.reasons
