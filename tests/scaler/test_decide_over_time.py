"""Time-domain properties of the decision core, checked over generated traces and policies.

Each run is the simulator (scaler.simulate): the real decide() in a closed loop against the
modelled backend, replicas following the decisions and record_action after, over minutes of
simulated time. Single-cycle rules are tested in test_decide.py; these are the properties a user
sees only over time: no oscillation under a standing condition, no starvation whatever the host
guard says, a return to the minimum within a bound computed from the policy, bounds never
crossed, a met latency objective letting a latency-only service scale down, and decisions that do
not depend on where the clock started.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simulation_checks import check_invariants

from scaler.policy import Policy, parse_policy
from scaler.simulate.engine import SimResult, Step, simulate
from scaler.simulate.trace import Trace, parse_trace_data

SVC, Q = "worker-io", "io_intensive"
PROFILE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STARTUP_S = 3.0
DRAIN_S = 1.0


@st.composite
def policies(draw: st.DrawFn, **fixed: Any) -> Policy:
    """One worker-io service with generated bounds, windows, cooldowns, steps and targets."""
    lo = draw(st.integers(0, 2))
    body: dict[str, Any] = {
        "queues": [Q],
        "min_replicas": lo,
        "max_replicas": draw(st.integers(max(lo, 1) + 1, 8)),
        "target": {
            "tasks_per_replica": draw(st.sampled_from([2, 4, 8, 16])),
            "tolerance": draw(st.sampled_from([0.0, 0.1, 0.2])),
        },
        "scale_up": {
            "stabilization_s": draw(st.sampled_from([0, 0, 4])),
            "cooldown_s": draw(st.sampled_from([0, 5])),
            "max_step": draw(st.integers(1, 4)),
        },
        "scale_down": {
            "stabilization_s": draw(st.sampled_from([10, 30, 60])),
            "cooldown_s": draw(st.sampled_from([0, 5, 10])),
            "max_step": draw(st.integers(1, 3)),
        },
        "scale_to_zero": {"idle_s": draw(st.sampled_from([0, 20, 60]))},
    }
    if draw(st.booleans()):
        body["target"]["latency_s"] = draw(st.sampled_from([5, 20]))
    # The warm pool (within max beside the minimum) and event-driven wake-ups, on or off.
    body["warm"] = draw(st.integers(0, min(2, body["max_replicas"] - lo)))
    body["warm_at_zero"] = draw(st.booleans())
    for key, value in fixed.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) else value
    interval = draw(st.sampled_from([1.0, 2.0]))
    wakeup = {"events": draw(st.booleans()), "debounce_s": draw(st.sampled_from([0.1, 0.5]))}
    return parse_policy(
        {"interval_s": interval, "stale_after_s": 10, "wakeup": wakeup, "services": {SVC: body}},
        env={},
    )


def make_trace(
    load: list[dict[str, Any]],
    duration_s: float,
    *,
    concurrency: int = 4,
    duration: dict[str, Any] | None = None,
    host_cpu: list[list[float]] | None = None,
) -> Trace:
    model: dict[str, Any] = {
        "services": {
            SVC: {
                "concurrency": concurrency,
                "startup_s": {"fixed": STARTUP_S},
                "drain_s": {"fixed": DRAIN_S},
            }
        },
        "queues": {Q: {"duration_s": duration or {"uniform": [1, 2]}}},
    }
    if host_cpu is not None:
        model["host"] = {"host_cpu": host_cpu}
    return parse_trace_data({"duration_s": duration_s, "load": load, "model": model}, "generated")


Load = tuple[list[dict[str, Any]], float]


@st.composite
def bursty_loads(draw: st.DrawFn) -> Load:
    """Bursts with idle gaps between them, and sometimes a trickle under them."""
    load: list[dict[str, Any]] = []
    at = draw(st.floats(0, 20))
    for _ in range(draw(st.integers(1, 3))):
        count = draw(st.integers(1, 300))
        spread = draw(st.sampled_from([0, 2, 20]))
        load.append({"kind": "burst", "queue": Q, "at": at, "count": count, "spread_s": spread})
        at += spread + draw(st.floats(5, 120))
    if draw(st.booleans()):
        load.append({"kind": "constant", "queue": Q, "rate": draw(st.sampled_from([0.2, 1.0]))})
    return load, at


def service_steps(r: SimResult) -> list[Step]:
    return [s for s in r.steps if s.service == SVC]


def last_completion(r: SimResult) -> float:
    ends = [e for log in r.tasks.values() for e in log.end if e == e]
    return max(ends, default=0.0)


def return_bound(policy: Policy) -> float:
    """Seconds from the last task's end until the service must be back at its minimum.

    From the policy alone, at worst: the down window; one down step per down cooldown (or per
    cycle) from max to min, one replica a step at worst; the quiet period for scale to zero; a
    drain; and two cycles of detection slack.
    """
    sp = policy.services[SVC]
    interval = policy.interval_s
    steps = sp.max_replicas - sp.min_replicas
    bound = sp.scale_down.stabilization_s + steps * max(sp.scale_down.cooldown_s, interval)
    if sp.min_replicas == 0:
        bound += sp.scale_to_zero.idle_s
    return bound + DRAIN_S + 2 * interval


def reversals(r: SimResult, after: float = 0.0) -> int:
    dirs = [1 if a.after > a.before else -1 for a in r.actions if a.t >= after]
    return sum(1 for a, b in itertools.pairwise(dirs) if a != b)


@PROFILE
@given(policy=policies(), load=bursty_loads(), seed=st.integers(0, 3))
def test_bounds_are_never_crossed_and_the_service_returns_to_its_minimum(
    policy: Policy, load: Load, seed: int
) -> None:
    trace = make_trace(*load)
    r = simulate(policy, trace, seed=seed)
    deadline = last_completion(r) + return_bound(policy)
    if r.horizon_s < deadline + 2 * policy.interval_s:  # watch past the bound, whatever settles
        r = simulate(policy, trace, seed=seed, horizon_s=deadline + 2 * policy.interval_s)
    check_invariants(r)
    sp = policy.services[SVC]
    assert r.published == r.completed, "every task ran"
    for s in service_steps(r):
        assert sp.min_replicas <= s.replicas <= sp.max_replicas, s
        assert s.desired is None or sp.min_replicas <= s.desired <= sp.max_replicas, s
    late = [s for s in service_steps(r) if s.t >= deadline]
    assert late, "steps after the bound"
    assert all(s.replicas == sp.min_replicas and s.draining == 0 for s in late), (
        f"not back at min {sp.min_replicas} within {return_bound(policy):.0f} s of the last "
        f"task: {[(s.t, s.replicas) for s in late[:5]]}"
    )


@PROFILE
@given(
    policy=policies(min_replicas=0, scale_to_zero={"idle_s": 0}),
    load=bursty_loads(),
    seed=st.integers(0, 3),
)
def test_no_starvation_a_queue_with_work_waiting_gets_a_consumer_whatever_the_host_says(
    policy: Policy, load: Load, seed: int
) -> None:
    # The host is over its CPU limit for the whole run: the guard blocks every scale-up it may.
    r = simulate(policy, make_trace(*load, host_cpu=[[0.0, 99.0]]), seed=seed)
    check_invariants(r)
    assert r.published == r.completed, "every task ran, if slowly"
    sp = policy.services[SVC]
    bound = sp.scale_up.stabilization_s + 2 * policy.interval_s + STARTUP_S
    steps = service_steps(r)
    for i, s in enumerate(steps):
        if s.waiting == 0:
            continue
        served = [
            x
            for x in steps[i:]
            if x.t <= s.t + bound + 1e-9 and (x.replicas - x.starting >= 1 or x.waiting == 0)
        ]
        assert served, f"work waiting at t={s.t:.0f} and no consumer within {bound:.0f} s"


@PROFILE
@given(
    policy=policies(),
    rate=st.sampled_from([1.0, 3.0, 6.0]),
    task_s=st.sampled_from([1.0, 2.0]),
)
def test_no_oscillation_under_steady_load(policy: Policy, rate: float, task_s: float) -> None:
    """Evenly spaced arrivals of equal tasks: once settled, the count never turns back."""
    duration = 1200.0
    trace = make_trace(
        [{"kind": "constant", "queue": Q, "rate": rate}],
        duration,
        duration={"fixed": task_s},
    )
    sp = policy.services[SVC]
    r = simulate(policy, trace, horizon_s=duration)
    settled = sp.scale_down.stabilization_s + return_bound(policy) + 60
    assert settled < duration / 2
    assert reversals(r, after=settled) == 0, [
        (a.t, a.before, a.after) for a in r.actions if a.t >= settled
    ]


@PROFILE
@given(
    max_replicas=st.integers(3, 8),
    down=st.sampled_from([10, 30]),
    target=st.sampled_from([400, 1000]),
)
def test_a_standing_emergency_never_steps_down_and_jumps_back(
    max_replicas: int, down: int, target: int
) -> None:
    """A flood that keeps the emergency queue past its depth for minutes: up once, then hold.

    The backlog target asks for fewer replicas than the emergency (tasks_per_replica large), the
    case where the emergency's count used to leave the down window's memory.
    """
    policy = parse_policy(
        {
            "services": {
                SVC: {
                    "queues": [Q],
                    "max_replicas": max_replicas,
                    "target": {"tasks_per_replica": target},
                    "emergency": {"queue": Q, "depth": 50},
                    "scale_down": {"stabilization_s": down, "cooldown_s": 5, "max_step": 1},
                }
            }
        },
        env={},
    )
    # A backlog of 300, then arrivals at exactly what max_replicas x 4 slots / 2 s can take:
    # at the emergency's count the backlog stands (past the depth) without growing; one replica
    # fewer and it grows. The backlog alone asks for one replica, so only the emergency holds.
    rate = max_replicas * 4 / 2.0
    trace = make_trace(
        [
            {"kind": "burst", "queue": Q, "at": 0, "count": 300},
            {"kind": "constant", "queue": Q, "rate": rate, "end": 300},
        ],
        300,
        duration={"fixed": 2.0},
    )
    r = simulate(policy, trace, horizon_s=300)
    flood = [s for s in service_steps(r) if s.waiting > 50]
    assert flood and flood[-1].t - flood[0].t > 5 * down
    during = [a for a in r.actions if flood[0].t <= a.t <= flood[-1].t]
    assert all(a.after > a.before for a in during), [(a.t, a.before, a.after) for a in during]
    # Not even asked for: the modelled backend would refuse to drain a busy replica, a real one
    # may catch a worker between two tasks.
    downs = [d for d in r.decisions if flood[0].t <= d.t <= flood[-1].t and d.action == "down"]
    assert not downs, [(d.t, d.current, d.desired, d.reasons) for d in downs[:3]]
    assert max(s.replicas for s in flood) == max_replicas


@PROFILE
@given(
    latency=st.sampled_from([5, 10]),
    burst=st.integers(200, 600),
    down=st.sampled_from([10, 30]),
)
def test_a_met_latency_objective_lets_a_latency_only_service_scale_down(
    latency: int, burst: int, down: int
) -> None:
    """A burst raises a latency-only service; a light trickle that follows keeps tasks in flight
    all the time but never waits: the objective is met, so the count comes back down."""
    policy = parse_policy(
        {
            "services": {
                SVC: {
                    "queues": [Q],
                    "max_replicas": 8,
                    "target": {"tasks_per_replica": None, "latency_s": latency},
                    "scale_down": {"stabilization_s": down, "cooldown_s": 5, "max_step": 1},
                }
            }
        },
        env={},
    )
    trace = make_trace(
        [
            {"kind": "burst", "queue": Q, "at": 0, "count": burst},
            {"kind": "constant", "queue": Q, "rate": 1.0},  # 2 tasks in flight on average
        ],
        900,
        duration={"fixed": 2.0},
    )
    r = simulate(policy, trace, horizon_s=900)
    steps = service_steps(r)
    peak = max(s.replicas for s in steps)
    assert peak >= 3, "the burst breached the objective and added replicas"
    tail = [s for s in steps if s.t >= 600]
    assert all(s.in_flight > 0 or s.waiting == 0 for s in tail)
    assert max(s.replicas for s in tail) <= 2, [(s.t, s.replicas) for s in tail[:5]]


def _decisions(r: SimResult) -> list[tuple[float, str, int | None, str, tuple[str, ...]]]:
    return [(d.t, d.service, d.desired, d.action, d.reasons) for d in r.decisions]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies(),
    load=bursty_loads(),
    origin=st.sampled_from([1_000_000.0, 1_700_000_000.0, 123_456.0]),
)
def test_decisions_do_not_depend_on_where_the_clock_started(
    policy: Policy, load: Load, origin: float
) -> None:
    trace = make_trace(*load)
    """The running scaler decides on a monotonic clock whose origin is arbitrary (and stepping
    the wall clock does not move it): the same trace gives the same decisions from any origin."""
    a = simulate(policy, trace, seed=1)
    b = simulate(policy, trace, seed=1, clock_origin=origin)
    assert _decisions(a) == _decisions(b)
    assert math.isclose(a.replica_seconds[SVC], b.replica_seconds[SVC])
