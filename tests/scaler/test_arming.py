"""The arming rule (scaler.arming): which services an arrival decides at once, and at what backlog.

Checked against the real decide(): a ring level is only useful if it is exactly the backlog at
which the decision changes its mind, so the properties feed the level back into decide().
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_decide_properties import NOW, PROFILE, SVC, obs_of, policies

from scaler.arming import ring_level
from scaler.decide import Decision, decide
from scaler.history import History
from scaler.policy import Policy, parse_policy


def decided(policy: Policy, replicas: int, waiting: int, in_flight: int) -> Decision:
    decisions, _ = decide(policy, obs_of(replicas, waiting, in_flight, 0.1, NOW), History(), NOW)
    return decisions[SVC]


def one(**body: Any) -> Policy:
    rules: dict[str, Any] = {"queues": ["x"], "min_replicas": 1, "max_replicas": 6}
    rules.update(body)
    return parse_policy({"services": {SVC: rules}}, env={})


def level_after(policy: Policy, replicas: int, waiting: int, in_flight: int) -> int | None:
    sp = policy.services[SVC]
    return ring_level(
        sp, decided(policy, replicas, waiting, in_flight), replicas, waiting, in_flight
    )


def test_an_idle_service_rings_at_the_backlog_that_scales_it() -> None:
    """At its minimum with replicas, only a backlog the depth rule scales on can change the
    decision: smaller ones cost none. At zero (or with a latency target only) any backlog."""
    p = one(target={"tasks_per_replica": 32, "tolerance": 0.1})
    level = level_after(p, 1, 0, 0)
    assert level == 35  # 32 x 1.1 = 35.2 of work
    assert decided(p, 1, level, 0).action == "hold"
    assert decided(p, 1, level + 1, 0).action == "up"
    asleep = one(min_replicas=0, target={"tasks_per_replica": 32})
    assert level_after(asleep, 0, 0, 0) == 0
    latency = one(target={"tasks_per_replica": None, "latency_s": 10})
    assert level_after(latency, 1, 0, 0) == 0


def test_a_burst_s_first_messages_held_arm_the_service_at_the_target_s_backlog() -> None:
    """The benchmark's case: the first ring saw 17 waiting and 4 in flight against 32 per
    replica and held; the service stays armed, at the backlog that scales it (the bug: it was
    disarmed, and the rest of the burst waited for the next tick)."""
    p = one(target={"tasks_per_replica": 32, "tolerance": 0.1})
    d = decided(p, 1, 17, 4)
    assert d.action == "hold"
    level = level_after(p, 1, 17, 4)
    assert level == 31  # 32 x 1.1 = 35.2 of work, less 4 in flight
    assert decided(p, 1, level, 4).action == "hold"
    assert decided(p, 1, level + 1, 4).action == "up"


def test_not_armed_where_an_early_decision_could_not_differ() -> None:
    # Above its minimum with a backlog: its ticks decide it.
    assert level_after(one(target={"tasks_per_replica": 32}), 2, 5, 8) is None
    # Latency only: time, not arrivals, changes the decision.
    assert level_after(one(target={"tasks_per_replica": None, "latency_s": 10}), 1, 5, 1) is None
    # Already wanting more (a cooldown holds it): an early decision is held as well.
    p = one(target={"tasks_per_replica": 4}, scale_up={"cooldown_s": 60})
    history = History()
    first, history = decide(p, obs_of(1, 20, 4, 0.1, NOW), history, NOW)
    assert first[SVC].action == "up"
    history = history.record_action(SVC, 1, first[SVC].desired or 1, NOW)
    again, _ = decide(p, obs_of(1, 20, 4, 0.1, NOW + 1), history, NOW + 1)
    assert again[SVC].action == "hold"
    assert ring_level(p.services[SVC], again[SVC], 1, 20, 4) is None


def test_an_emergency_depth_lowers_the_level() -> None:
    p = one(target={"tasks_per_replica": 100}, emergency={"queue": "x", "depth": 20})
    level = level_after(p, 1, 5, 0)
    assert level == 20
    assert decided(p, 1, level + 1, 0).action == "up"


@settings(PROFILE, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(policy=policies(), waiting=st.integers(0, 300), in_flight=st.integers(0, 40))
def test_a_ring_level_is_where_the_decision_changes_its_mind(
    policy: Policy, waiting: int, in_flight: int
) -> None:
    """Over random policies: one more message than the level makes the decision want more
    (the ring is worth a decision), and without a latency objective or an emergency rule the
    level itself does not (no ring is wasted)."""
    sp = policy.services[SVC]
    current = sp.min_replicas
    assume(current >= 1)
    level = level_after(policy, current, waiting, in_flight)
    assume(level is not None and level > 0)
    assert level is not None
    assert level >= waiting  # only growth rings
    over = decided(policy, current, level + 1, in_flight)
    assert (over.recommended or 0) > current or over.emergency
    if sp.target.latency_s is None and sp.emergency is None and level > waiting:
        at = decided(policy, current, level, in_flight)
        assert (at.recommended or 0) <= current
