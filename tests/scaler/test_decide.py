"""The decision core, rule by rule: one table case (or a short sequence) per rule.

Pure function, no services: observations are built by hand, time is a number we choose.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from scaler.decide import Decision, ServiceControl, decide
from scaler.history import History, ServiceHistory
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation
from scaler.policy import Policy, parse_policy

NOW = 10_000.0
SVC = "worker-io"
Q = "io_intensive"
OLD = NOW - 10_000  # "first seen long ago": the down window is full


def make_policy(**service: Any) -> Policy:
    body: dict[str, Any] = {"queues": [Q], "min_replicas": 1, "max_replicas": 10}
    body.update(service)
    return parse_policy({"services": {SVC: body}}, env={})


def make_obs(
    replicas: int | None,
    waiting: int | None = 0,
    in_flight: int | None = 0,
    oldest: float | None = None,
    *,
    now: float = NOW,
    read_at: float | None = None,
    workers: Resources | None = None,
    host: Resources | None = None,
    busy: int | None = None,
) -> Observations:
    at = now if read_at is None else read_at
    sig = QueueSignal(Q, waiting, in_flight, oldest, read_at=at)
    so = ServiceObservation(
        SVC, replicas, {Q: sig}, workers or Resources(10.0, 10.0, now), busy_replicas=busy
    )
    return Observations(now, {SVC: so}, host or Resources(10.0, 10.0, now))


def seasoned(**fields: Any) -> History:
    """A history in which the service has been watched long enough for a full down window."""
    return History({SVC: ServiceHistory(first_seen_at=OLD, **fields)})


def one(
    policy: Policy, obs: Observations, history: History | None = None, now: float = NOW, **kw: Any
) -> Decision:
    decisions, _ = decide(policy, obs, history if history is not None else seasoned(), now, **kw)
    return decisions[SVC]


def said(decision: Decision, fragment: str) -> bool:
    return any(fragment in r for r in decision.reasons)


# --- target tracking ---------------------------------------------------------------------------


def test_target_tracking_clamp_and_step_in_words() -> None:
    policy = make_policy(max_replicas=8, target={"tasks_per_replica": 20})
    d = one(policy, make_obs(2, waiting=230, in_flight=10))
    assert (d.current, d.desired, d.action, d.recommended) == (2, 6, "up", 8)
    assert d.reasons == (
        "work 240 (waiting 230, in flight 10) / target 20 per replica -> 12",
        "clamped to max 8",
        "step limit +4 -> 6",
    )


@pytest.mark.parametrize(
    ("current", "work", "expected"),
    [
        (10, 100, 10),  # on target
        (10, 109, 10),  # +9%: inside the 10% dead band
        (10, 90, 10),  # -10%: on the edge of the band, still inside (raw would be 9)
        (10, 111, 12),  # +11%: outside -> ceil(11.1)
        (10, 89, 9),  # -11%: outside -> ceil(8.9)
        (0, 1, 1),  # no dead band around zero
    ],
)
def test_tolerance_dead_band(current: int, work: int, expected: int) -> None:
    policy = make_policy(
        min_replicas=0,
        max_replicas=20,
        scale_up={"max_step": 20},
        scale_down={"max_step": 20, "stabilization_s": 0, "cooldown_s": 0},
    )
    d = one(policy, make_obs(current, waiting=work))
    assert d.desired == expected, d.reasons
    if current and expected == current and work in (90, 109):
        assert said(d, "within tolerance 0.1")


def test_in_flight_counts_as_work_so_a_busy_fleet_is_not_empty() -> None:
    policy = make_policy(scale_down={"stabilization_s": 0, "cooldown_s": 0, "max_step": 10})
    d = one(policy, make_obs(5, waiting=0, in_flight=50))
    assert d.desired == 5 and d.action == "hold"


def test_queues_of_a_service_are_summed() -> None:
    policy = parse_policy({"services": {SVC: {"queues": ["a", "b"]}}}, env={})
    sigs = {
        "a": QueueSignal("a", 30, 0, 1.0, read_at=NOW),
        "b": QueueSignal("b", 15, 5, 1.0, read_at=NOW),
    }
    so = ServiceObservation(SVC, 1, sigs, Resources(1, 1, NOW))
    obs = Observations(NOW, {SVC: so}, Resources(1, 1, NOW))
    decisions, _ = decide(policy, obs, seasoned(), NOW)
    assert decisions[SVC].recommended == 5
    assert said(decisions[SVC], "work 50 (waiting 45, in flight 5)")


def test_min_is_kept_and_restored_at_once() -> None:
    policy = make_policy(min_replicas=3, scale_up={"max_step": 1, "cooldown_s": 60})
    assert one(policy, make_obs(3)).desired == 3
    # Below min (a replica died): back to min in one go, past the step limit and the cooldown.
    d = one(policy, make_obs(0), seasoned(last_scale_at=NOW - 1))
    assert (d.desired, d.action) == (3, "up"), d.reasons


def test_above_max_is_brought_down_at_once() -> None:
    policy = make_policy(max_replicas=4)
    d = one(policy, make_obs(9, waiting=500), seasoned(last_scale_at=NOW - 1))
    assert (d.desired, d.action) == (4, "down"), d.reasons


# --- latency objective and saturated workers ---------------------------------------------------


def test_latency_breach_adds_a_replica_even_on_target() -> None:
    policy = make_policy(target={"tasks_per_replica": 10, "latency_s": 5})
    d = one(policy, make_obs(2, waiting=20, oldest=12.0))
    assert d.desired == 3
    assert said(d, "oldest waiting 12.0 s > objective 5 s -> 3")
    assert one(policy, make_obs(2, waiting=20, oldest=4.0)).desired == 2


def test_latency_unknown_blocks_scale_down_only() -> None:
    policy = make_policy(
        target={"tasks_per_replica": 10, "latency_s": 5},
        scale_down={"stabilization_s": 0, "cooldown_s": 0},
    )
    d = one(policy, make_obs(4, waiting=5, oldest=None))
    assert (d.desired, d.action) == (4, "hold")
    assert said(d, "age of oldest waiting message unknown: no scale-down")
    assert one(policy, make_obs(1, waiting=50, oldest=None)).desired == 5


def test_latency_only_target() -> None:
    policy = make_policy(
        min_replicas=0,
        target={"tasks_per_replica": None, "latency_s": 5},
        scale_down={"stabilization_s": 0, "cooldown_s": 0},
        scale_to_zero={"idle_s": 0},
    )
    assert one(policy, make_obs(3, waiting=100, oldest=1.0)).desired == 3
    assert one(policy, make_obs(3, waiting=100, oldest=9.0)).desired == 4
    assert one(policy, make_obs(0, waiting=1, oldest=0.1)).desired == 1
    assert one(policy, make_obs(3, waiting=0, in_flight=0)).desired == 2


def test_saturated_workers_with_backlog_add_a_replica() -> None:
    policy = make_policy(resources={"cpu_percent": 80})
    hot = Resources(95.0, 20.0, NOW)
    d = one(policy, make_obs(3, waiting=30, workers=hot))
    assert d.desired == 4 and said(d, "workers saturated (cpu 95% > limit 80%) with 30 waiting")
    # Hot but nothing waiting: more replicas would not help.
    assert one(policy, make_obs(3, waiting=0, in_flight=30, workers=hot)).desired == 3
    # A stale worker reading is not used.
    stale = Resources(95.0, 20.0, NOW - 60)
    assert one(policy, make_obs(3, waiting=30, workers=stale)).desired == 3


# --- stabilisation windows ---------------------------------------------------------------------


def test_down_window_keeps_the_highest_recent_recommendation() -> None:
    policy = make_policy(scale_down={"stabilization_s": 60, "cooldown_s": 0, "max_step": 10})
    hist = seasoned(recommendations=((NOW - 50, 6), (NOW - 20, 4)))
    d = one(policy, make_obs(6, waiting=10), hist)
    assert (d.recommended, d.desired) == (1, 6), d.reasons
    assert said(d, "down window 60 s: highest recommendation 6 -> 6")
    # Ten seconds later the 6 has left the window; the 4 is the highest now.
    later = seasoned(recommendations=((NOW - 50, 6), (NOW - 20, 4)))
    d = one(policy, make_obs(6, waiting=10, now=NOW + 11), later, now=NOW + 11)
    assert d.desired == 4, d.reasons


def test_up_window_takes_the_lowest_recent_recommendation() -> None:
    policy = make_policy(scale_up={"stabilization_s": 10, "max_step": 10, "cooldown_s": 0})
    hist = seasoned(recommendations=((NOW - 5, 3),))
    d = one(policy, make_obs(2, waiting=80), hist)
    assert (d.recommended, d.desired) == (8, 3), d.reasons
    assert said(d, "up window 10 s: lowest recommendation 3 -> 3")


def test_a_fresh_scaler_waits_a_full_down_window_before_scaling_down() -> None:
    policy = make_policy(scale_down={"stabilization_s": 60, "cooldown_s": 0})
    d = one(policy, make_obs(5, waiting=0), History())
    assert (d.desired, d.action) == (5, "hold")
    assert said(d, "observed for 0 s only: no scale-down before a full down window (60 s)")
    # ...but it may scale up at once.
    assert one(policy, make_obs(1, waiting=40), History()).desired == 4


def test_decide_records_recommendations_and_prunes_the_window() -> None:
    policy = make_policy(scale_down={"stabilization_s": 30}, scale_up={"stabilization_s": 5})
    hist = seasoned(recommendations=((NOW - 100, 9), (NOW - 10, 3), (NOW - 5, 2)))
    _, new = decide(policy, make_obs(2, waiting=20), hist, NOW)
    # 9 is older than both windows; the older 2 is superseded by this cycle's 2.
    assert new.get(SVC).recommendations == ((NOW - 10, 3), (NOW, 2))
    assert hist.get(SVC).recommendations[0] == (NOW - 100, 9)  # the input is not changed


# --- cooldowns, steps and recording actions ----------------------------------------------------


def test_scale_up_cooldown() -> None:
    policy = make_policy(scale_up={"cooldown_s": 10})
    d = one(policy, make_obs(2, waiting=60), seasoned(last_scale_at=NOW - 4))
    assert (d.desired, d.action) == (2, "hold")
    assert said(d, "scale-up cooldown: last change 4 s ago < 10 s -> hold 2")
    assert one(policy, make_obs(2, waiting=60), seasoned(last_scale_at=NOW - 11)).desired == 6


def test_scale_down_cooldown() -> None:
    policy = make_policy(scale_down={"stabilization_s": 0, "cooldown_s": 30})
    d = one(policy, make_obs(4, waiting=0), seasoned(last_scale_at=NOW - 29))
    assert (d.desired, d.action) == (4, "hold") and said(d, "scale-down cooldown")
    assert one(policy, make_obs(4, waiting=0), seasoned(last_scale_at=NOW - 31)).desired == 3


@pytest.mark.parametrize(
    ("rule", "current", "waiting", "expected"),
    [
        ({"max_step": 2}, 2, 100, 4),
        ({"max_step": None, "max_step_percent": 50}, 4, 100, 6),
        ({"max_step": None, "max_step_percent": None}, 1, 100, 10),
    ],
)
def test_scale_up_step(rule: dict[str, Any], current: int, waiting: int, expected: int) -> None:
    policy = make_policy(scale_up=rule)
    assert one(policy, make_obs(current, waiting=waiting)).desired == expected


def test_scale_down_step() -> None:
    policy = make_policy(scale_down={"stabilization_s": 0, "cooldown_s": 0, "max_step": 2})
    d = one(policy, make_obs(8, waiting=0))
    assert d.desired == 6 and said(d, "step limit -2 -> 6")


def test_only_a_carried_out_action_starts_a_cooldown() -> None:
    policy = make_policy(scale_up={"cooldown_s": 10})
    d1, hist = decide(policy, make_obs(2, waiting=60), seasoned(), NOW)
    assert d1[SVC].desired == 6
    failed = hist.record_action(SVC, before=2, after=2, now=NOW)  # the backend reached nothing
    assert failed is hist
    assert one(policy, make_obs(2, waiting=60, now=NOW + 2), failed, NOW + 2).desired == 6
    done = hist.record_action(SVC, before=2, after=4, now=NOW)  # partial: reached 4 of 6
    assert done.get(SVC).last_direction == "up"
    d2 = one(policy, make_obs(4, waiting=60, now=NOW + 2), done, NOW + 2)
    assert d2.action == "hold" and said(d2, "scale-up cooldown")
    with pytest.raises(ValueError, match="before=-1"):
        hist.record_action(SVC, before=-1, after=2, now=NOW)


# --- scale to zero -----------------------------------------------------------------------------


def zero_policy(idle_s: float = 120) -> Policy:
    return make_policy(
        min_replicas=0,
        scale_to_zero={"idle_s": idle_s},
        scale_down={"stabilization_s": 60, "cooldown_s": 0},
        scale_up={"cooldown_s": 30},
    )


def test_scale_to_zero_waits_for_the_quiet_period() -> None:
    policy = zero_policy(idle_s=120)
    d = one(policy, make_obs(1), seasoned(idle_since=NOW - 50))
    assert d.desired == 1 and said(d, "idle 50 s of the 120 s quiet period -> keep 1")
    # Quiet period over, but a recommendation of 1 is still inside the 60 s down window.
    d = one(policy, make_obs(1), seasoned(idle_since=NOW - 130, recommendations=((NOW - 5, 1),)))
    assert (d.desired, d.action) == (1, "hold"), d.reasons
    # Both agree: the window holds only zeros and the quiet period is over.
    d = one(policy, make_obs(1), seasoned(idle_since=NOW - 130, recommendations=((NOW - 5, 0),)))
    assert (d.desired, d.action) == (0, "down"), d.reasons
    assert said(d, "idle 130 s >= quiet period 120 s")


def test_idle_clock_starts_and_resets_with_the_work() -> None:
    policy = zero_policy()
    _, h = decide(policy, make_obs(1), seasoned(), NOW)
    assert h.get(SVC).idle_since == NOW
    _, h2 = decide(policy, make_obs(1, now=NOW + 5), h, NOW + 5)
    assert h2.get(SVC).idle_since == NOW  # still idle: the clock keeps running from NOW
    _, h3 = decide(policy, make_obs(1, in_flight=1, now=NOW + 6), h2, NOW + 6)
    assert h3.get(SVC).idle_since is None


def test_never_to_zero_while_a_task_is_in_flight() -> None:
    policy = zero_policy(idle_s=0)
    d = one(policy, make_obs(1, waiting=0, in_flight=1), seasoned(idle_since=NOW - 999))
    assert d.desired == 1


def test_wake_from_zero_on_the_first_message_despite_cooldown() -> None:
    policy = zero_policy()
    d = one(policy, make_obs(0, waiting=1, oldest=0.2), seasoned(last_scale_at=NOW - 1))
    assert (d.desired, d.action) == (1, "up") and said(d, "waking from zero")
    assert one(policy, make_obs(0), seasoned()).action == "hold"


# --- emergency ---------------------------------------------------------------------------------


def test_emergency_depth_jumps_past_step_and_cooldown() -> None:
    policy = make_policy(max_replicas=12, emergency={"queue": Q, "depth": 500})
    d = one(policy, make_obs(2, waiting=501), seasoned(last_scale_at=NOW - 1))
    assert (d.desired, d.emergency) == (12, True), d.reasons
    assert said(d, "emergency on queue io_intensive (depth 501 > 500): 12 at once")
    d = one(policy, make_obs(2, waiting=500), seasoned(last_scale_at=NOW - 1))
    assert (d.desired, d.emergency) == (2, False)  # at the threshold, not past it


def test_emergency_latency_and_scale_to() -> None:
    policy = make_policy(emergency={"queue": Q, "latency_s": 30, "scale_to": 5})
    d = one(policy, make_obs(1, waiting=3, oldest=31.0))
    assert (d.desired, d.emergency) == (5, True)
    assert one(policy, make_obs(1, waiting=3, oldest=29.0)).emergency is False


# --- missing and stale data --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obs", "fragment"),
    [
        (make_obs(4, waiting=None), "queue io_intensive waiting count missing"),
        (make_obs(4, in_flight=None), "queue io_intensive in-flight count missing"),
        (make_obs(4, read_at=NOW - 11), "queue io_intensive stale (read 11.0 s ago, limit 10 s)"),
    ],
)
def test_missing_or_stale_queue_signal_holds(obs: Observations, fragment: str) -> None:
    policy = make_policy(scale_down={"stabilization_s": 0, "cooldown_s": 0})
    d = one(policy, obs)
    assert (d.current, d.desired, d.action) == (4, 4, "hold")
    assert said(d, fragment), d.reasons


def test_unknown_replicas_and_unobserved_service_hold() -> None:
    policy = make_policy()
    d = one(policy, make_obs(None, waiting=100))
    assert (d.current, d.desired, d.action) == (None, None, "hold")
    assert said(d, "replica count unknown")
    decisions, _ = decide(policy, Observations(NOW, {}, Resources(1, 1, NOW)), History(), NOW)
    assert decisions[SVC].action == "hold" and said(decisions[SVC], "not observed")


def test_a_queue_not_read_holds() -> None:
    policy = make_policy()
    so = ServiceObservation(SVC, 2, {}, Resources(1, 1, NOW))
    obs = Observations(NOW, {SVC: so}, Resources(1, 1, NOW))
    decisions, _ = decide(policy, obs, History(), NOW)
    assert said(decisions[SVC], "queue io_intensive not read")


def test_missing_data_breaks_the_idle_streak() -> None:
    policy = zero_policy()
    _, h = decide(policy, make_obs(1, waiting=None), seasoned(idle_since=NOW - 500), NOW)
    assert h.get(SVC).idle_since is None


@pytest.mark.parametrize(
    "blind",
    [
        pytest.param({"obs": make_obs(None)}, id="replica count unknown"),
        pytest.param({"controls": {SVC: ServiceControl(paused=True)}}, id="paused"),
        pytest.param({"controls": {SVC: ServiceControl(pinned=1)}}, id="pinned"),
    ],
)
def test_time_the_core_could_not_see_is_not_idle_time(blind: dict[str, Any]) -> None:
    """Idle 100 s, then 400 s the core could not judge (unknown count, paused, pinned), then one
    empty reading: the quiet period starts again there, no step to zero on idle time that was
    never seen (issue 18, defect 3: "idle 502 s >= quiet period 300 s")."""
    policy = zero_policy(idle_s=300)
    history = seasoned(idle_since=NOW - 100, recommendations=((NOW - 5, 0),))
    for t in range(10, 410, 10):
        _, history = decide(
            policy, blind.get("obs", make_obs(1, now=NOW + t)), history, NOW + t,
            blind.get("controls"),
        )  # fmt: skip
    later = NOW + 420
    decisions, history = decide(policy, make_obs(1, now=later), history, later)
    assert decisions[SVC].desired == 1, decisions[SVC].reasons
    assert history.get(SVC).idle_since == later


# --- host guard --------------------------------------------------------------------------------


def test_host_pressure_blocks_scale_up_and_says_so() -> None:
    policy = make_policy()
    d = one(policy, make_obs(2, waiting=60, host=Resources(20.0, 95.0, NOW)))
    assert (d.desired, d.action) == (2, "hold")
    assert said(d, "host memory 95% > limit 90%: no scale-up (would be 6) -> 2")


def test_host_pressure_blocks_even_an_emergency_but_not_the_minimum() -> None:
    policy = make_policy(min_replicas=2, emergency={"queue": Q, "depth": 10})
    hot = Resources(99.0, 20.0, NOW)
    assert one(policy, make_obs(2, waiting=999, host=hot)).desired == 2
    assert one(policy, make_obs(0, waiting=999, host=hot)).desired == 2


@pytest.mark.parametrize(
    "host", [Resources(None, 10.0, NOW), Resources(10.0, None, NOW), Resources(10.0, 10.0, 0.0)]
)
def test_host_unknown_blocks_scale_up(host: Resources) -> None:
    d = one(make_policy(), make_obs(2, waiting=60, host=host))
    assert d.action == "hold" and said(d, "no scale-up")


def three_services(urgency: dict[str, int], mins: dict[str, int] | None = None) -> Policy:
    mins = mins or {}
    return parse_policy(
        {
            "services": {
                name: {
                    "queues": [name],
                    "urgency": u,
                    "min_replicas": mins.get(name, 1),
                    "scale_down": {"stabilization_s": 600, "cooldown_s": 30},
                }
                for name, u in urgency.items()
            }
        },
        env={},
    )


def three_obs(state: dict[str, tuple[int, int, int | None]], host: Resources) -> Observations:
    """name -> (replicas, work in flight, busy replicas)."""
    services = {
        name: ServiceObservation(
            name,
            replicas,
            {name: QueueSignal(name, 0, work, None, read_at=NOW)},
            Resources(10, 10, NOW),
            busy_replicas=busy,
        )
        for name, (replicas, work, busy) in state.items()
    }
    return Observations(NOW, services, host)


PRESSURE = Resources(20.0, 97.0, NOW)


def test_under_pressure_the_least_urgent_service_gives_way() -> None:
    # Every service's load fits its count (no decision of its own); the down window would
    # hold them for 10 minutes, but the host cannot wait.
    policy = three_services({"a": 5, "b": 0, "c": 9})
    obs = three_obs({"a": (3, 25, 2), "b": (3, 25, 2), "c": (3, 25, 2)}, PRESSURE)
    hist = History({n: ServiceHistory(first_seen_at=OLD) for n in "abc"})
    decisions, _ = decide(policy, obs, hist, NOW)
    assert [decisions[n].desired for n in "abc"] == [3, 2, 3]
    assert said(decisions["b"], "host memory 97% > limit 90%: least urgent (urgency 0) gives way")


def test_giving_way_skips_busy_services_at_min_and_cooling() -> None:
    policy = three_services({"a": 0, "b": 1, "c": 2, "d": 3}, mins={"b": 3})
    obs = three_obs({"a": (3, 25, 3), "b": (3, 25, 1), "c": (3, 25, 1), "d": (3, 25, 1)}, PRESSURE)
    hist = History(
        {
            "a": ServiceHistory(first_seen_at=OLD),  # every replica busy
            "b": ServiceHistory(first_seen_at=OLD),  # at its minimum
            "c": ServiceHistory(first_seen_at=OLD, last_scale_at=NOW - 5),  # cooling down
            "d": ServiceHistory(first_seen_at=OLD),
        }
    )
    decisions, _ = decide(policy, obs, hist, NOW)
    assert [decisions[n].desired for n in "abcd"] == [3, 3, 3, 2]


def test_nobody_gives_way_when_every_service_is_busy_or_already_shrinking() -> None:
    policy = three_services({"a": 0, "b": 1})
    hist = History({n: ServiceHistory(first_seen_at=OLD) for n in "ab"})
    busy = three_obs({"a": (3, 25, 3), "b": (3, 25, None)}, PRESSURE)  # b: 25 tasks >= 3
    decisions, _ = decide(policy, busy, hist, NOW)
    assert all(d.action == "hold" for d in decisions.values())
    calm = three_obs({"a": (3, 25, 1), "b": (3, 25, 1)}, Resources(20.0, 50.0, NOW))
    decisions, _ = decide(policy, calm, hist, NOW)
    assert all(d.action == "hold" for d in decisions.values())


# --- operator controls -------------------------------------------------------------------------


def test_paused_holds_and_pinned_targets_its_count() -> None:
    policy = make_policy(max_replicas=4)
    obs = make_obs(2, waiting=999)
    d = one(policy, obs, controls={SVC: ServiceControl(paused=True, note="incident 42")})
    assert (d.desired, d.action) == (2, "hold")
    assert d.reasons == ("paused by operator (incident 42): holding",)
    d = one(policy, obs, controls={SVC: ServiceControl(pinned=7)})
    assert (d.desired, d.action) == (7, "up") and d.reasons == ("pinned to 7 by operator",)
    d = one(policy, obs, controls={SVC: ServiceControl(paused=True, pinned=7)})
    assert d.action == "hold"
    d = one(policy, make_obs(None), controls={SVC: ServiceControl(pinned=3)})
    assert (d.desired, d.action) == (None, "hold")
    with pytest.raises(ValueError, match="pinned: -1 is invalid"):
        ServiceControl(pinned=-1)


# --- defects found by running the core over time (issue 9) ------------------------------------


def test_a_standing_emergency_is_remembered_by_the_down_window() -> None:
    """The emergency's count enters the window memory: no step down under a standing flood."""
    policy = make_policy(
        max_replicas=6,
        target={"tasks_per_replica": 200},  # the backlog alone asks for 3
        emergency={"queue": Q, "depth": 100},
        scale_down={"stabilization_s": 30, "cooldown_s": 10},
    )
    # Already at the emergency's count, the flood still standing, the last change long ago and
    # the window holding only the target's own (lower) recommendations.
    hist = seasoned(recommendations=((NOW - 20, 2), (NOW - 10, 2)), last_scale_at=NOW - 100)
    decisions, after = decide(policy, make_obs(6, waiting=500), hist, NOW)
    d = decisions[SVC]
    assert (d.desired, d.recommended) == (6, 6), d.reasons
    assert after.get(SVC).recommendations[-1] == (NOW, 6)
    # Thirty seconds after the flood ends the window still holds 6; past it, the count may fall.
    later = after
    for t in range(2, 31, 2):
        _, later = decide(policy, make_obs(6, waiting=0, now=NOW + t), later, NOW + t)
    assert one(policy, make_obs(6, waiting=0, now=NOW + 30), later, NOW + 30).desired == 6
    assert one(policy, make_obs(6, waiting=0, now=NOW + 31), later, NOW + 31).desired == 5


def test_work_waiting_at_zero_gets_a_consumer_whatever_the_host_says() -> None:
    policy = make_policy(min_replicas=0, scale_to_zero={"idle_s": 60})
    hot = Resources(99.0, 20.0, NOW)
    d = one(policy, make_obs(0, waiting=40, oldest=3.0, host=hot))
    assert (d.desired, d.action) == (1, "up"), d.reasons
    assert said(d, "host cpu 99% > limit 90%: no scale-up (would be 4) -> 1")
    # Nothing waiting: the guard holds a service at zero.
    assert one(policy, make_obs(0, waiting=0, host=hot)).desired == 0


def test_giving_way_never_takes_the_last_replica() -> None:
    policy = three_services({"a": 0, "b": 5}, mins={"a": 0, "b": 0})
    obs = three_obs({"a": (1, 0, 0), "b": (2, 0, 0)}, PRESSURE)
    hist = History(
        {n: ServiceHistory(first_seen_at=OLD, recommendations=((NOW - 1, 2),)) for n in "ab"}
    )
    decisions, _ = decide(policy, obs, hist, NOW)
    # a (least urgent) is at its last replica: b gives way instead; a goes to zero only
    # through its own down window and quiet period.
    assert (decisions["a"].desired, decisions["b"].desired) == (1, 1)


def test_a_met_latency_objective_lets_a_latency_only_service_scale_down() -> None:
    policy = make_policy(
        target={"tasks_per_replica": None, "latency_s": 5},
        scale_down={"stabilization_s": 0, "cooldown_s": 0, "max_step": 10},
    )
    # Six replicas, nothing waiting, three tasks running on three of them.
    d = one(policy, make_obs(6, waiting=0, in_flight=3, busy=3))
    assert (d.desired, d.action) == (3, "down"), d.reasons
    # Without a busy count, at most as many replicas as tasks can be busy.
    assert one(policy, make_obs(6, waiting=0, in_flight=2)).desired == 2
    # Work waiting past half the objective: no scale-down (hysteresis against oscillation).
    assert one(policy, make_obs(6, waiting=3, in_flight=6, oldest=3.0, busy=6)).desired == 6


# --- the warm pool (issue 14) -------------------------------------------------------------------


def with_warm(obs: Observations, warm: int) -> Observations:
    so = obs.services[SVC]
    return Observations(obs.at, {SVC: replace(so, warm=warm)}, obs.host)


def test_the_warm_pool_is_kept_beside_the_serving_count_within_max() -> None:
    policy = make_policy(max_replicas=4, warm=2, target={"tasks_per_replica": 10})
    idle = one(policy, with_warm(make_obs(1), 0))
    assert (idle.desired, idle.warm_current, idle.warm) == (1, 0, 2)
    assert said(idle, "warm pool refilled 0 -> 2")
    busy = one(policy, with_warm(make_obs(1, waiting=100), 2))
    assert (busy.desired, busy.warm) == (4, 0)  # serving + warm within max: room for serving
    assert said(busy, "warm pool 0 of 2: serving 4 + warm within max 4")
    steady = one(policy, with_warm(make_obs(1), 2))
    assert (steady.action, steady.warm) == ("hold", 2)
    assert not said(steady, "warm pool")  # a full pool says nothing


def test_the_host_guard_stops_refills_and_pressure_releases_the_pool_first() -> None:
    policy = parse_policy(
        {
            "host": {"cpu_percent": 80},
            "services": {
                SVC: {
                    "queues": [Q],
                    "min_replicas": 1,
                    "max_replicas": 10,
                    "warm": 2,
                    "target": {"tasks_per_replica": 1},
                }
            },
        },
        env={},
    )
    hot = Resources(95.0, 10.0, NOW)
    unknown = Resources(None, 10.0, NOW)
    no_refill = one(policy, with_warm(make_obs(1, host=unknown), 1))
    assert (no_refill.warm, no_refill.desired) == (1, 1)
    assert said(no_refill, "warm pool not refilled (would be 2) -> 1")
    # Two replicas for two tasks in flight, one of them idle (prefetch took both on one).
    released = one(policy, with_warm(make_obs(2, in_flight=2, busy=1, host=hot), 2))
    assert released.warm == 0 and said(released, "warm pool released (2 -> 0)")
    # Releasing the pool relieves the host this cycle: no serving replica gives way too.
    assert released.desired == 2
    without_pool = one(policy, with_warm(make_obs(2, in_flight=2, busy=1, host=hot), 0))
    assert without_pool.desired == 1 and said(without_pool, "gives way")


def test_a_service_at_zero_keeps_its_pool_only_when_the_policy_says_so() -> None:
    keep = make_policy(min_replicas=0, warm=1)
    drop = make_policy(min_replicas=0, warm=1, warm_at_zero=False)
    assert one(keep, with_warm(make_obs(0), 1)).warm == 1
    d = one(drop, with_warm(make_obs(0), 1))
    assert d.warm == 0 and said(d, "warm_at_zero is false")
    assert one(drop, with_warm(make_obs(1, waiting=1), 0)).warm == 1  # awake: the pool again


def test_pause_holds_the_pool_and_missing_signals_hold_it_too() -> None:
    policy = make_policy(warm=2)
    paused = one(policy, with_warm(make_obs(1), 1), controls={SVC: ServiceControl(paused=True)})
    assert (paused.action, paused.warm) == ("hold", 1)
    blind = one(policy, with_warm(make_obs(1, waiting=None), 1))
    assert (blind.action, blind.warm) == ("hold", 1)
    without = one(make_policy(), with_warm(make_obs(1), 1))
    assert without.warm == 0 and said(without, "no warm pool in the policy")
