"""The simulator against the loop's own pieces and the local backend: the same decisions.

Three comparisons, from exact to real:

- The decision path, exactly: every Observations the simulator built is fed, in order, to the
  real ``decide()`` with a ``History`` kept as ``scaler.loop.Scaler`` keeps it (``record_action``
  of the counts the backend reached), and the arming is computed as the loop's
  ``_watch_arrivals`` does (``ring_level`` over ``queue_totals``): the simulator must have
  decided, recorded and armed the same at every cycle.
- The debounce: the real ``Debouncer`` on its own thread and clock against the same class
  clocked by hand as the simulator's ``Detection`` drives it.
- Real processes: ``Scaler.cycle`` on the local backend (real Celery workers, Redis) and the
  simulator on the same burst take the same sequence of count changes. Their times are not
  compared: real workers start as fast as this host lets them (the documented tolerance).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from scaler_support import ping_names
from support.polling import poll_until

import scaler.simulate.engine as engine
from scaler.arming import ring_level
from scaler.backends.base import ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.decide import decide, queue_totals
from scaler.history import History
from scaler.loop import PolicySource, Scaler
from scaler.observations import Observations
from scaler.policy import parse_policy
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.simulate.trace import parse_trace_data
from scaler.simulate.wakeups import Detection
from scaler.wakeup import Debouncer

POLICY = {
    "interval_s": 2.0,
    "host": {"cpu_percent": 100, "memory_percent": 100},
    "wakeup": {"events": True, "debounce_s": 0.5},
    "defaults": {
        "min_replicas": 1,
        "max_replicas": 4,
        "target": {"tasks_per_replica": 4, "tolerance": 0.1},
        "scale_up": {"stabilization_s": 0, "cooldown_s": 3},
        "scale_down": {"stabilization_s": 10, "cooldown_s": 4, "max_step": 1},
    },
    "services": {
        "io": {"queues": ["io_intensive"], "warm": 1},
        "cpu": {"queues": ["cpu_intensive", "default"], "max_replicas": 2},
    },
}
TRACE = {
    "duration_s": 120,
    "model": {"services": {"io": {"concurrency": 2}, "cpu": {"concurrency": 1}}},
    "load": [
        {"kind": "burst", "queue": "io_intensive", "at": 5, "count": 30},
        {"kind": "burst", "queue": "io_intensive", "at": 41.3, "count": 12, "spread_s": 1},
        {"kind": "poisson", "queue": "io_intensive", "rate": 0.3, "start": 60, "end": 100},
        {"kind": "burst", "queue": "cpu_intensive", "at": 20, "count": 6},
        {"kind": "poisson", "queue": "default", "rate": 0.2, "start": 0, "end": 90},
    ],
}


def test_the_simulator_decides_records_and_arms_as_the_loop_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = parse_policy(POLICY)
    trace = parse_trace_data(TRACE, "differential")
    cycles: list[tuple[Observations, float, dict[str, Any]]] = []
    armed: list[dict[str, int]] = []

    def spy_decide(p: Any, obs: Observations, history: History, now: float) -> Any:
        out = decide(p, obs, history, now)
        cycles.append((obs, now, out[0]))
        return out

    real_arm = Detection.arm

    def spy_arm(self: Detection, decided: Any, seen: Any) -> None:
        real_arm(self, decided, seen)
        armed.append(dict(self._levels))

    monkeypatch.setattr(engine, "decide", spy_decide)
    monkeypatch.setattr(Detection, "arm", spy_arm)
    result = engine.simulate(policy, trace, seed=3)
    monkeypatch.undo()

    assert result.stats["woken_cycles"] > 0  # the events path ran, not only the ticks
    assert any(a.after > a.before for a in result.actions)
    assert any(a.after < a.before for a in result.actions)
    reached = defaultdict(list)
    for a in result.actions:
        reached[a.t].append(a)

    history = History()
    assert len(cycles) == result.cycles == len(armed)
    for (obs, now, sim_decided), sim_levels in zip(cycles, armed, strict=True):
        decided, history = decide(policy, obs, history, now)  # the loop's call
        assert decided == sim_decided, f"cycle at {now}"
        levels: dict[str, int] = {}
        for name, sp in policy.services.items():  # as Scaler._watch_arrivals arms
            seen = obs.services[name]
            signals = [seen.queues[q] for q in sp.queues if q in seen.queues]
            level = ring_level(sp, decided[name], seen.replicas, *queue_totals(signals))
            if level is not None:
                levels[name] = level
        assert levels == sim_levels, f"arming at {now}"
        for a in reached.pop(now, []):  # what the backend reached, as the loop records it
            assert a.asked == decided[a.service].desired
            history = history.record_action(a.service, a.before, a.after, now)
    assert not reached


def test_the_debouncer_rings_the_same_on_its_thread_and_in_simulated_time() -> None:
    """The same arrivals, the same window: the thread's rings (first at once, the window's
    arrivals folded into one trailing ring, a later arrival at once) are the clocked ones."""
    window = 0.4
    offsets = [0.0, 0.05, 0.1, 1.0]  # a burst, then one alone after its window
    rang: list[tuple[float, set[str]]] = []
    origin = time.monotonic()
    lock = threading.Lock()

    def ring(services: set[str]) -> None:
        with lock:
            rang.append((time.monotonic() - origin, services))

    live = Debouncer(ring, armed=lambda s: True, window_s=lambda: window)
    live.start()
    try:
        seen: list[float] = []
        for off in offsets:
            time.sleep(max(0.0, origin + off - time.monotonic()))
            seen.append(time.monotonic() - origin)
            live.arrival("io")
        time.sleep(window + 0.3)
    finally:
        live.stop()

    clocked: list[float] = []
    now = [0.0]
    sim = Debouncer(
        lambda services: clocked.append(now[0]), armed=lambda s: True,
        window_s=lambda: window, clock=lambda: now[0],
    )  # fmt: skip
    due: float | None = None
    for t in seen:
        while due is not None and due <= t:
            now[0] = due
            due = sim.fire_due()
        now[0] = t
        sim.arrival("io")
        due = sim.fire_due()
    while due is not None:
        now[0] = due
        due = sim.fire_due()

    assert [s for _, s in rang] == [{"io"}] * len(clocked)
    assert len(clocked) == 3  # at once, trailing at the window's end, the lone one at once
    for (t_live, _), t_sim in zip(rang, clocked, strict=True):
        assert t_live == pytest.approx(t_sim, abs=0.15)  # the thread's scheduling on a busy host


# -- the same burst on real worker processes (the local backend) and in the simulator ---------

REAL_POLICY = {
    "interval_s": 1.0,
    "stale_after_s": 10,
    "host": {"cpu_percent": 100, "memory_percent": 100},  # a loaded CI host must not hold it
    "wakeup": {"events": False},  # the ticks only: the debounce is compared above
    "services": {
        "io": {
            "queues": ["io_intensive"],
            "min_replicas": 1,
            "max_replicas": 3,
            "target": {"tasks_per_replica": 4, "tolerance": 0.1},
            "scale_up": {"stabilization_s": 0, "cooldown_s": 0},
            # One replica a step: the way down is 3, 2, 1 however the last tasks' ends fall
            # between real cycles (with 2 a step, a real run may skip 2 where the model's
            # simultaneous ends do not: a timing difference, not a decision rule's).
            "scale_down": {"stabilization_s": 6, "cooldown_s": 0, "max_step": 1},
        }
    },
}
BURST, TASK_S, CONCURRENCY = 24, 2.0, 2


def changes(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(before, after) for before, after in pairs if before != after]


@pytest.mark.slow
def test_the_local_backend_and_the_simulator_change_the_count_the_same_way(
    app: Any, env: dict[str, str], tmp_path: Any
) -> None:
    """A burst of 24 two-second tasks on workers of 2 slots: up to the maximum at once, then
    down to the minimum in the same steps, for real (``Scaler.cycle`` on the local backend)
    and in the simulation. Only the sequence of count changes is compared, not their times:
    those depend on how fast real workers start on this host (the tolerance is on timing)."""
    policy = parse_policy(REAL_POLICY, env={})
    backend = LocalBackend(
        app=app, workdir=tmp_path / "workers", env=env, grace_s=20.0, concurrency=CONCURRENCY
    )
    backend.manage([ServiceSpec("io", ("io_intensive",))])
    scaler = Scaler(PolicySource(policy), backend, Collector(queue_reader_for_app(app)))
    real: list[tuple[int, int]] = []
    try:
        scaler.cycle()  # the minimum: one worker
        poll_until(lambda: len(ping_names(app)) >= 1, "the first worker answering")
        for _ in range(BURST):
            app.send_task(
                "tasks.io_intensive.wait", kwargs={"duration": TASK_S}, queue="io_intensive"
            )
        deadline = time.monotonic() + 50.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            report = scaler.cycle()
            seen = report.observations.services["io"]
            real.append((seen.replicas or 0, backend.replicas("io")))
            idle = not seen.queues["io_intensive"].waiting
            if len(changes(real)) >= 2 and real[-1][1] == 1 and idle:
                break
            time.sleep(max(0.0, policy.interval_s - (time.monotonic() - started)))
    finally:
        backend.stop_all(timeout_s=10.0)

    trace = parse_trace_data(
        {
            "duration_s": 60,
            "model": {
                "services": {"io": {"concurrency": CONCURRENCY}},
                "queues": {"io_intensive": {"duration_s": {"fixed": TASK_S}}},
            },
            "load": [{"kind": "burst", "queue": "io_intensive", "at": 0.5, "count": BURST}],
        },
        "differential-real",
    )
    sim = engine.simulate(policy, trace, seed=0)
    simulated = [(a.before, a.after) for a in sim.actions]
    assert simulated == [(1, 3), (3, 2), (2, 1)]
    assert changes(real) == simulated, real
