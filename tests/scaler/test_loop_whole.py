"""The whole loop with the local-process backend and real workers on a real Redis.

A burst on one queue scales its group up within a few cycles while the other group stays put,
the backlog drains, the group returns to its minimum after the down window, and every task of the
burst left exactly one effect in PostgreSQL, none lost. A task with a future ETA leaves a
scale-to-zero service at zero until it is due, then wakes it once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from scaler_support import effects, local_policy
from support.polling import poll_until

from scaler.backends.base import ScaleResult
from scaler.backends.local import LocalBackend
from scaler.fencing import UNFENCED, Fence
from scaler.loop import PolicySource, Scaler
from scaler.policy import parse_policy
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.status import read_snapshot

pytestmark = pytest.mark.slow

BURST = 60
DOWN_WINDOW_S = 3.0

POLICY = local_policy(
    {"io": ["io_intensive"], "calm": ["default"]},
    interval_s=0.5,
    max_replicas=4,
    up={"stabilization_s": 0, "cooldown_s": 1, "max_step": 4},
    down={"stabilization_s": DOWN_WINDOW_S, "cooldown_s": 1, "max_step": 4},
)


@contextmanager
def scaler_running(
    policy: dict[str, Any], backend: LocalBackend, app: Any, tmp_path: Path
) -> Iterator[Scaler]:
    """The real loop in a thread over ``backend``; stopped, and its workers with it, after."""
    scaler = Scaler(
        PolicySource(parse_policy(policy, env={})),
        backend,
        Collector(queue_reader_for_app(app)),
        state_file=tmp_path / "state.json",
    )
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield scaler
    finally:
        stop.set()
        thread.join(30)
        backend.stop_all(timeout_s=15.0)


@pytest.fixture
def running(app: Any, env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Scaler, LocalBackend]]:
    backend = LocalBackend(app=app, workdir=tmp_path / "workers", env=env, grace_s=20.0)
    with scaler_running(POLICY, backend, app, tmp_path) as scaler:
        yield scaler, backend


def test_a_burst_scales_one_group_up_drains_and_returns_to_min(
    running: tuple[Scaler, LocalBackend], app: Any, database_url: str, env: dict[str, str]
) -> None:
    scaler, backend = running
    assert scaler.state_file is not None
    poll_until(
        lambda: backend.replicas("io") == 1 and backend.replicas("calm") == 1,
        "both groups at their min",
    )
    calm_seen: set[int] = set()

    def replicas(service: str) -> int:
        calm_seen.add(backend.replicas("calm"))
        return backend.replicas(service)

    cycles_before = scaler.cycles
    ids = [
        app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.3}).id for _ in range(BURST)
    ]

    poll_until(lambda: replicas("io") >= 3, "io to scale up under the burst", timeout_s=20)
    assert scaler.cycles - cycles_before <= 10, "scaled up within a few cycles"
    # The status snapshot is written when a cycle ends: the scale-up's own cycle may still be
    # acting (starting workers) when the count is already 3.
    state_file = scaler.state_file
    status = poll_until(
        lambda: ((io := read_snapshot(state_file)["services"]["io"])["current"] or 0) >= 3 and io,
        "the scale-up's cycle in the status snapshot",
        timeout_s=10,
    )
    assert status["action"] in ("up", "hold") and status["desired"] >= 3

    done = poll_until(
        lambda: len(effects(database_url, ids)) == BURST and effects(database_url, ids),
        "the whole burst to finish",
        timeout_s=120,
    )
    assert set(done) == set(ids) and set(done.values()) == {1}  # every task, exactly once

    poll_until(
        lambda: replicas("io") == 1 and backend.wait_for_drains(0.1),
        "io back at its minimum after the down window",
        timeout_s=60,
    )
    assert calm_seen == {1}, "the group without work never moved"
    snapshot = read_snapshot(scaler.state_file)
    assert snapshot["services"]["io"]["current"] in (1, 2)  # last cycle may predate the drain
    assert any("drained" in e for e in scaler.events) or backend.reconcile()

    # Nothing stranded: the queue and kombu's unacked hash hold none of the burst.
    client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    prefix = env["CELERY_KEY_PREFIX"]
    assert sum(client.llen(k) for k in client.scan_iter(f"{prefix}io_intensive*")) == 0
    assert client.hlen(f"{prefix}unacked") == 0


# -- a task with a future ETA on a service at zero ------------------------------------------------

ETA_S = 20.0
ETA_POLICY = {
    "interval_s": 0.5,
    "stale_after_s": 5,
    "host": {"cpu_percent": 100, "memory_percent": 100},
    "services": {
        "sched": {
            "queues": ["io_intensive"],
            "min_replicas": 0,
            "max_replicas": 1,
            "target": {"tasks_per_replica": 5},
            "scale_up": {"stabilization_s": 0, "cooldown_s": 1},
            "scale_down": {"stabilization_s": 2, "cooldown_s": 1},
            "scale_to_zero": {"idle_s": 2},
        }
    },
}


@dataclass
class CountingLocalBackend(LocalBackend):
    """The real local backend, with every scale call that changed the count recorded."""

    actions: list[tuple[float, int, int]] = field(default_factory=list)

    def scale(self, service: str, replicas: int, fence: Fence = UNFENCED) -> ScaleResult:
        result = super().scale(service, replicas, fence)
        if result.after != result.before:
            self.actions.append((time.monotonic(), result.before, result.after))
        return result


def test_a_future_eta_task_leaves_a_service_at_zero_until_due_then_runs_once(
    app: Any, env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    backend = CountingLocalBackend(app=app, workdir=tmp_path / "workers", env=env, grace_s=20.0)
    with scaler_running(ETA_POLICY, backend, app, tmp_path) as scaler:
        poll_until(lambda: scaler.cycles >= 2, "the scaler to cycle at zero")
        published = time.monotonic()
        task = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.5}, countdown=ETA_S)
        done = poll_until(
            lambda: effects(database_url, [task.id]), "the ETA task to run", ETA_S + 60
        )
        assert done == {task.id: 1}
        # Back to zero once idle, and nothing more: one wake, one park.
        poll_until(
            lambda: backend.replicas("sched") == 0 and backend.wait_for_drains(0.1),
            "the service back at zero",
            60,
        )
        parked_at = scaler.cycles
        poll_until(lambda: scaler.cycles >= parked_at + 4, "a few cycles at zero")
        assert [(b, a) for _, b, a in backend.actions] == [(0, 1), (1, 0)], backend.actions
        # Held at zero while the task was not due: a waiting message would have woken it at once.
        up_at = backend.actions[0][0]
        assert up_at >= published + ETA_S - 1.0, up_at - published
        assert effects(database_url, [task.id]) == {task.id: 1}
