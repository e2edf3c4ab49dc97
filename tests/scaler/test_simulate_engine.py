"""The simulator's engine: the real decide() in a closed loop against the modelled backend.

No mocks: the simulator is the model, the core is the real one. Each test checks a behaviour
that could break: conservation of tasks, bounds, the drain rate a static fleet must show, seeds,
start-up delays, and that a scale-down never cuts a running task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simulation_checks import check_invariants

from scaler.policy import Policy, load_policy, parse_policy
from scaler.simulate.engine import SimResult, settle_time, simulate
from scaler.simulate.model import build_model, parse_model_spec
from scaler.simulate.report import summarise
from scaler.simulate.trace import Trace, TraceError, load_trace, parse_trace_data

ROOT = Path(__file__).resolve().parents[2]


def policy(io: dict[str, Any] | None = None, **top: Any) -> Policy:
    rules = {
        "queues": ["io_intensive"],
        "min_replicas": 1,
        "max_replicas": 6,
        "target": {"tasks_per_replica": 8},
        "scale_down": {"stabilization_s": 20, "cooldown_s": 4, "max_step": 2},
    }
    rules.update(io or {})
    return parse_policy({**top, "services": {"worker-io": rules}}, env={})


def trace(load: list[dict[str, Any]], model: dict[str, Any] | None = None, **kw: Any) -> Trace:
    data: dict[str, Any] = {"load": load, **kw}
    data["model"] = {
        "services": {
            "worker-io": {"concurrency": 4, "startup_s": {"fixed": 3}, "drain_s": {"fixed": 1}}
        },
        "queues": {"io_intensive": {"duration_s": {"uniform": [1, 2]}}},
        **(model or {}),
    }
    return parse_trace_data(data, "test.yaml")


def burst(at: float, count: int, spread: float = 0) -> dict[str, Any]:
    return {"kind": "burst", "queue": "io_intensive", "at": at, "count": count, "spread_s": spread}


def io_steps(r: SimResult) -> list[Any]:
    return [s for s in r.steps if s.service == "worker-io"]


def test_a_burst_scales_up_drains_and_returns_to_min() -> None:
    r = simulate(policy(), trace([burst(10, 600, 2)], duration_s=60), seed=1)
    check_invariants(r)
    assert r.published == r.completed == 600
    steps = io_steps(r)
    assert max(s.replicas for s in steps) == 6
    assert steps[-1].replicas == 1 and steps[-1].draining == 0
    assert r.actions[0].after > r.actions[0].before  # first up, then only down
    ups = [a for a in r.actions if a.after > a.before]
    assert ups and all(a.t < 40 for a in ups)
    last_task = max(r.tasks["io_intensive"].end)
    assert r.horizon_s >= last_task + settle_time(r.policy, r.model) - r.policy.interval_s


def test_static_policy_drains_at_exactly_concurrency_over_duration() -> None:
    p = policy({"min_replicas": 1, "max_replicas": 1})
    t = trace(
        [burst(0, 100)],
        model={"queues": {"io_intensive": {"duration_s": {"fixed": 2}}}},
        duration_s=10,
    )
    r = simulate(p, t)
    check_invariants(r)
    summary = summarise(r)["services"]["worker-io"]
    assert summary["drain_s"] == pytest.approx(math.ceil(100 / 4) * 2.0)  # 4 slots, 2 s each
    assert summary["scale_actions"] == 0
    assert summary["latency_p50_s"] == pytest.approx(24.0)  # task 50 starts in wave 13 (t=24)
    assert summary["replica_seconds"] == pytest.approx(r.horizon_s)


def test_same_seed_same_summary_other_seed_differs() -> None:
    t = trace([burst(5, 300, 1)], duration_s=30)
    a = summarise(simulate(policy(), t, seed=7))
    b = summarise(simulate(policy(), t, seed=7))
    c = summarise(simulate(policy(), t, seed=8))
    assert a == b
    assert a["services"]["worker-io"] != c["services"]["worker-io"]


def test_startup_delay_is_respected_before_the_first_task() -> None:
    t = trace(
        [burst(0, 200)],
        model={
            "services": {
                "worker-io": {
                    "concurrency": 4,
                    "startup_s": {"fixed": 7.5},
                    "drain_s": {"fixed": 1},
                }
            }
        },
        duration_s=10,
    )
    r = simulate(policy(), t)
    check_invariants(r)
    added = [life for life in r.replicas if life.created > 0]
    assert added
    for life in added:
        assert life.ready == pytest.approx(life.created + 7.5)
        on_it = [
            s
            for s, rid in zip(
                r.tasks["io_intensive"].start, r.tasks["io_intensive"].replica, strict=True
            )
            if rid == life.id
        ]
        assert on_it and min(on_it) >= life.ready


def test_scale_down_with_busy_replicas_removes_only_idle_ones() -> None:
    # Long tasks keep replicas busy when the backlog is gone: the down decisions come while
    # tasks still run, and the backend may only take the idle replicas.
    p = policy(
        {
            "scale_down": {"stabilization_s": 0, "cooldown_s": 0, "max_step": 6},
            "target": {"tasks_per_replica": 4},
        }
    )
    t = trace(
        [burst(0, 24), burst(30, 3)],
        model={"queues": {"io_intensive": {"duration_s": {"uniform": [5, 60]}}}},
        duration_s=40,
    )
    r = simulate(p, t, seed=3)
    check_invariants(r)
    assert r.completed == r.published == 27
    downs = [d for d in r.decisions if d.action == "down"]
    assert downs  # decide() asked to go down while tasks were running
    partial = [a for a in r.actions if a.asked < a.after]
    refused = len(downs) - len([a for a in r.actions if a.after < a.before])
    assert partial or refused > 0  # some were cut short: busy replicas are kept


def test_host_over_its_limit_blocks_scale_up() -> None:
    t = trace([burst(5, 400)], model={"host": {"host_cpu": [[0, 99]]}}, duration_s=10)
    r = simulate(policy(), t)
    check_invariants(r)
    assert max(s.replicas for s in io_steps(r)) == 1
    assert any("host cpu 99%" in reason for d in r.decisions for reason in d.reasons)
    t2 = trace([burst(5, 400)], model={"host": {"host_cpu": [[0, 99], [20, None]]}}, duration_s=10)
    r2 = simulate(policy(), t2)
    first_up = min(a.t for a in r2.actions if a.after > a.before)
    assert first_up >= 20  # the schedule ends at 20 s: the model's own CPU again


def test_explicit_horizon_stops_there_and_counts_what_is_left() -> None:
    p = policy({"min_replicas": 1, "max_replicas": 1})
    t = trace(
        [burst(0, 100)],
        model={"queues": {"io_intensive": {"duration_s": {"fixed": 2}}}},
        duration_s=10,
    )
    r = simulate(p, t, horizon_s=11)
    check_invariants(r)
    assert r.horizon_s == 11 and r.cycles == 6  # cycles at 0, 2, ..., 10
    s = summarise(r)["services"]["worker-io"]
    assert s["completed"] == 20 and s["unfinished"] == 80 and s["drain_s"] is None
    assert s["replica_seconds"] == pytest.approx(11)


def test_scale_to_zero_and_wake() -> None:
    p = policy({"min_replicas": 0, "scale_to_zero": {"idle_s": 10}})
    r = simulate(p, trace([burst(0, 20), burst(200, 20)], duration_s=210))
    check_invariants(r)
    assert r.completed == 40
    counts = [s.replicas for s in io_steps(r)]
    assert 0 in counts
    assert counts[-1] == 0
    zero_at = next(s.t for s in io_steps(r) if s.replicas == 0)
    assert zero_at < 200  # idle and at zero between the bursts, then woken
    assert any(a.before == 0 and a.after > 0 and a.t >= 200 for a in r.actions)


def test_untouched_queue_is_an_error() -> None:
    t = parse_trace_data({"load": [{"kind": "burst", "queue": "zzz", "at": 0, "count": 1}]}, "t")
    with pytest.raises(TraceError, match="zzz"):
        simulate(policy(), t)


@settings(max_examples=25, deadline=None)
@given(
    bursts=st.lists(
        st.tuples(st.integers(0, 120), st.integers(1, 400), st.integers(0, 5)),
        min_size=1,
        max_size=4,
    ),
    max_replicas=st.integers(1, 5),
    min_replicas=st.integers(0, 1),
    seed=st.integers(0, 3),
    emergency=st.booleans(),
)
def test_property_bounds_conservation_and_no_cut_task(
    bursts: list[tuple[int, int, int]],
    max_replicas: int,
    min_replicas: int,
    seed: int,
    emergency: bool,
) -> None:
    rules: dict[str, Any] = {
        "max_replicas": max_replicas,
        "min_replicas": min_replicas,
        "scale_to_zero": {"idle_s": 20},
    }
    if emergency:
        rules["emergency"] = {"queue": "io_intensive", "depth": 100}
    t = trace([burst(a, n, s) for a, n, s in bursts], duration_s=130)
    r = simulate(policy(rules), t, seed=seed)
    check_invariants(r)
    assert r.published == r.completed == sum(n for _, n, _ in bursts)
    assert all(a.after <= max_replicas for a in r.actions)
    assert io_steps(r)[-1].replicas == min_replicas


def test_bench2_trace_reproduces_the_benchmark_order() -> None:
    """bench 2 measured oracle 55 s < default 62 s < keda-like 89 s < static 343 s."""
    tr = load_trace(ROOT / "scaler/simulate/traces/bench2-burst.yaml")
    drains = {}
    for name, path in [
        ("default", "compose/scaler-policy.yaml"),
        ("oracle", "scaler/simulate/policies/oracle.yaml"),
        ("keda-like", "scaler/simulate/policies/keda-like.yaml"),
        ("static", "scaler/simulate/policies/static.yaml"),
    ]:
        pol = load_policy(ROOT / path, env={})
        r = simulate(pol, tr, build_model(pol, tr.model), seed=0, decisions="none")
        check_invariants(r)
        drains[name] = summarise(r)["services"]["worker-io"]["drain_s"]
    assert drains["oracle"] < drains["default"] < drains["keda-like"] < drains["static"]
    assert drains["default"] / drains["oracle"] < 1.2
    assert drains["static"] == pytest.approx(900 / (4 / 1.5), rel=0.05)


def test_layered_model_spec_overrides_the_trace() -> None:
    t = trace([burst(0, 40)], duration_s=5)
    p = policy({"min_replicas": 1, "max_replicas": 1})
    spec = parse_model_spec(
        {
            "services": {"worker-io": {"concurrency": 40}},
            "queues": {"io_intensive": {"duration_s": 1}},
        },
        "m",
    )
    r = simulate(p, t, build_model(p, t.model, spec))
    assert summarise(r)["services"]["worker-io"]["drain_s"] == pytest.approx(1.0)


def test_plot_series_change_when_things_happen_not_at_the_next_cycle() -> None:
    from scaler.simulate.report import replica_series, waiting_series

    p = policy({"min_replicas": 1, "max_replicas": 1})
    t = trace(
        [burst(0, 100)],
        model={"queues": {"io_intensive": {"duration_s": {"fixed": 2}}}},
        duration_s=10,
    )
    times, wait = waiting_series(simulate(p, t))["worker-io"]
    at = dict(zip(times, wait, strict=True))
    assert (at[0.0], at[1.0], at[2.0], at[46.0], at[48.0]) == (96, 96, 92, 4, 0)

    r = simulate(policy(), trace([burst(10, 600, 2)], duration_s=60), seed=1)
    first = r.actions[0]
    times, reps = replica_series(r)["worker-io"]
    assert reps[0] == 1 and times[1] == first.t and reps[1] == first.after
    assert reps[-1] == io_steps(r)[-1].replicas


# -- the warm pool and event-driven detection (issue 14) -----------------------------------------


def first_up(r: SimResult) -> Any:
    return next(a for a in r.actions if a.after > a.before)


def test_a_warm_pool_takes_a_burst_in_milliseconds_and_is_refilled() -> None:
    """The pool's replica consumes promote_s after the decision; the cold one startup_s (3 s)
    after; the pool is refilled at once, and serving + warm stays within max."""
    t = trace([burst(31, 200)], duration_s=60)
    cold = simulate(policy(), t, seed=1)
    warm = simulate(policy({"warm": 1}), t, seed=1)
    check_invariants(warm)
    assert warm.published == warm.completed == 200
    up_cold, up_warm = first_up(cold), first_up(warm)
    io = warm.tasks["io_intensive"]
    initial = {life.id for life in warm.replicas if life.created == 0.0 and not life.warm}

    def first_start_beyond(r: SimResult, initial: set[int]) -> float:
        log = r.tasks["io_intensive"]
        return min(s for s, rid in zip(log.start, log.replica, strict=True) if rid not in initial)

    cold_initial = {life.id for life in cold.replicas if life.created == 0.0}
    assert first_start_beyond(warm, initial) - up_warm.t <= 0.05
    assert first_start_beyond(cold, cold_initial) - up_cold.t >= 3.0
    refills = [life for life in warm.replicas if life.warm and life.created == up_warm.t]
    assert refills, "the pool is refilled when its replica is taken"
    assert summarise(warm)["services"]["worker-io"]["warm_seconds"] > 0
    assert summarise(cold)["services"]["worker-io"]["warm_seconds"] == 0
    assert len(io.start) == 200


def test_scale_down_returns_drained_replicas_to_the_pool_before_stopping_any() -> None:
    """At max the pool gives its room to serving replicas (serving + warm <= max); on the way
    down the drained replicas refill it, so no cold start refills it after the peak."""
    r = simulate(policy({"warm": 2}), trace([burst(5, 400)], duration_s=30), seed=2)
    check_invariants(r)
    steps = io_steps(r)
    peak_at = min(s.t for s in steps if s.replicas == 6)
    assert any(s.warm == 0 for s in steps if s.t >= peak_at), "the pool made room at max"
    first_down = min(a.t for a in r.actions if a.after < a.before)
    cold_refills = [life for life in r.replicas if life.warm and life.created >= first_down]
    assert not cold_refills, "drained replicas, not cold starts, refill the pool"
    assert steps[-1].warm == 2 and steps[-1].replicas == 1
    stopped = [life for life in r.replicas if life.drain_start is not None]
    assert len(stopped) == 6 - 1 - 2  # the rest went back to the pool


def test_warm_at_zero_false_releases_the_pool_when_the_service_sleeps() -> None:
    p = policy(
        {"min_replicas": 0, "warm": 1, "warm_at_zero": False, "scale_to_zero": {"idle_s": 0}}
    )
    keep = policy({"min_replicas": 0, "warm": 1, "scale_to_zero": {"idle_s": 0}})
    t = trace([burst(5, 50)], duration_s=20)
    released, kept = simulate(p, t, seed=3), simulate(keep, t, seed=3)
    for r in (released, kept):
        check_invariants(r)
        assert io_steps(r)[-1].replicas == 0
    assert io_steps(released)[-1].warm == 0
    assert io_steps(kept)[-1].warm == 1


def test_events_wake_the_scaler_for_a_new_backlog_and_a_flood_costs_few_decisions() -> None:
    """A burst between two cycles is decided on within milliseconds with events, at the next
    cycle without; a long Poisson flood wakes the loop a bounded number of times."""
    t = trace([burst(31, 200)], duration_s=60)
    polled = simulate(policy(wakeup={"events": False}), t, seed=1)
    woken = simulate(policy(), t, seed=1)
    assert first_up(polled).t == 32.0
    assert 31.0 < first_up(woken).t <= 31.02
    assert woken.stats["woken_cycles"] >= 1 and polled.stats["woken_cycles"] == 0
    flood = trace([{"kind": "poisson", "queue": "io_intensive", "rate": 50.0}], duration_s=120)
    r = simulate(policy(wakeup={"debounce_s": 0.5}), flood, seed=4, horizon_s=120)
    check_invariants(r)
    assert r.stats["woken_cycles"] <= 120 / 0.5
    assert r.cycles <= 120 / 2 + r.stats["woken_cycles"] + 1


def test_a_burst_spread_over_time_wakes_the_scaler_once_it_reaches_what_the_target_scales_on() -> (
    None
):
    """The reaction benchmark's case, offline: a burst spread over half a second reaches a
    service at its minimum with idle slots. Its first messages (idle slots, then a backlog
    within the target) wake nothing; the scaler wakes once the backlog is what the target
    scales on, decides up, and never waits for the next periodic cycle. (Before, the first
    waiting message woke it, that decision held, and the service was disarmed till the tick.)"""
    t = trace([burst(30.5, 200, 0.5)], duration_s=60)
    woken = simulate(policy(), t, seed=1)
    polled = simulate(policy(wakeup={"events": False}), t, seed=1)
    check_invariants(woken)
    assert first_up(polled).t == 32.0
    up = first_up(woken)
    assert 30.5 < up.t < 31.0
    held = [d for d in woken.decisions if d.service == "worker-io" and 30.5 < d.t < up.t]
    assert held == [], "a decision spent on a backlog the target does not scale on"


def test_a_scale_up_to_max_takes_the_booting_warm_replica_never_one_over_max() -> None:
    """max 3, the pool's replica still booting when a burst asks for max (no room left for the
    pool): it is taken as serving (as WarmPool.commit does) instead of a cold start beside it
    while it is stopped; no instant holds more than max replicas, warm and leaving included."""
    r = simulate(policy({"warm": 1, "max_replicas": 3}), trace([burst(1, 300)], duration_s=30),
                 seed=3)  # fmt: skip
    check_invariants(r)
    assert r.published == r.completed == 300
    up = first_up(r)
    assert (up.before, up.after) == (1, 3) and up.t < 3.0, "the pool's replica still boots"
    edges = sorted(
        [(life.created, 1) for life in r.replicas]
        + [(life.gone, -1) for life in r.replicas if life.gone is not None]
    )
    alive = peak = 0
    for _, step in edges:
        alive += step
        peak = max(peak, alive)
    assert peak <= 3, f"{peak} replicas at once, max 3"
    (pooled,) = [life for life in r.replicas if life.warm and life.created == 0.0]
    assert pooled.gone is None or pooled.gone > up.t + 3, "the booting one was stopped"


def test_a_scale_down_blocked_by_busy_replicas_leaves_the_pool_no_room_past_max() -> None:
    """max 2 with warm 1: at 2 serving the pool has no room. When the decision says 1 but both
    replicas are busy (nothing can be drained), the pool must not be refilled beside them:
    the busy replicas a scale-down could not remove take its room."""
    p = policy(
        {
            "warm": 1,
            "max_replicas": 2,
            "scale_down": {"stabilization_s": 2, "cooldown_s": 0, "max_step": 2},
        }
    )
    t = trace(
        [burst(1, 16)],
        model={"queues": {"io_intensive": {"duration_s": {"fixed": 30}}}},
        duration_s=90,
    )
    r = simulate(p, t, seed=1)
    check_invariants(r)  # serving + warm <= max at every step
    blocked = [s for s in io_steps(r) if s.desired == 1 and s.replicas == 2 and s.in_flight >= 5]
    assert blocked, "no cycle where the scale-down was blocked by busy replicas: test is vacuous"
