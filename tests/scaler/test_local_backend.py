"""The local-process backend with real Celery worker processes on a real Redis broker.

Each test module gets its own Redis key prefix, so its queues and control messages are its own.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from scaler_support import consumed, effects, ping_names
from support.polling import poll_until

from scaler.backends.base import Backend, BackendEvent, ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.backends.restart_backoff import RestartBackoff
from scaler.restore import UnackedRestorer

pytestmark = pytest.mark.slow

SERVICE = "io"


@pytest.fixture
def backend(app: Any, env: dict[str, str], tmp_path: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(app=app, workdir=tmp_path / "workers", env=env, grace_s=20.0)
    backend.manage([ServiceSpec(SERVICE, ("io_intensive",))])
    try:
        yield backend
    finally:
        backend.stop_all(timeout_s=10.0)


def names(backend: LocalBackend) -> set[str]:
    return {w.name for w in backend.workers(SERVICE)}


def active_on(app: Any, task_id: str) -> str | None:
    """The worker running ``task_id`` right now, if any."""
    for worker, tasks in (app.control.inspect(timeout=1.0).active() or {}).items():
        if any(t["id"] == task_id for t in tasks):
            return str(worker)
    return None


def test_satisfies_the_backend_protocol(backend: LocalBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.services() == [SERVICE]
    assert backend.replicas(SERVICE) == 0


def test_scale_up_starts_workers_and_scale_down_drains_them(
    backend: LocalBackend, app: Any
) -> None:
    result = backend.scale(SERVICE, 2)
    assert (result.before, result.after, len(result.started)) == (0, 2, 2)
    assert backend.replicas(SERVICE) == 2
    poll_until(lambda: ping_names(app) >= names(backend), "both workers answering ping")

    down = backend.scale(SERVICE, 1)
    assert (down.before, down.after, len(down.draining)) == (0 + 2, 1, 1)
    assert backend.replicas(SERVICE) == 1  # the draining one no longer counts
    assert backend.wait_for_drains(30.0)
    kinds = [e.kind for e in backend.reconcile()]
    assert kinds == ["drained"]
    assert len(backend.workers(SERVICE)) == 1
    assert down.draining[0] not in ping_names(app)


def test_drain_waits_for_the_running_task_and_picks_the_idle_worker(
    backend: LocalBackend, app: Any, database_url: str
) -> None:
    backend.scale(SERVICE, 2)
    poll_until(lambda: ping_names(app) >= names(backend), "both workers answering ping")
    task = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 3.0})
    busy = poll_until(lambda: active_on(app, task.id), "the task to start")

    down = backend.scale(SERVICE, 1)
    assert down.draining and down.draining[0] != busy, "the idle worker goes first"
    assert backend.wait_for_drains(30.0)

    # Now drain the busy one while it runs: it must finish the task, then stop warm.
    busy_task = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 3.0})
    poll_until(lambda: active_on(app, busy_task.id), "the second task to start")
    backend.scale(SERVICE, 0)
    assert backend.wait_for_drains(40.0)
    events = backend.reconcile()
    assert [e.kind for e in events] == ["drained", "drained"], events
    assert effects(database_url, [task.id, busy_task.id]) == {task.id: 1, busy_task.id: 1}


def test_a_killed_worker_is_replaced(backend: LocalBackend, app: Any) -> None:
    backend.scale(SERVICE, 1)
    (victim,) = backend.workers(SERVICE)
    poll_until(lambda: victim.name in ping_names(app), "the worker answering ping")
    os.kill(int(victim.ident), signal.SIGKILL)
    poll_until(lambda: backend.replicas(SERVICE) == 0, "the backend to see the death")
    events = backend.reconcile()
    assert [e.kind for e in events] == ["replaced"]
    assert victim.name in events[0].detail
    (replacement,) = backend.workers(SERVICE)
    assert replacement.ident != victim.ident
    assert backend.replicas(SERVICE) == 1
    poll_until(lambda: replacement.name in ping_names(app), "the replacement answering ping")


def test_an_adopted_worker_without_consumers_gets_its_queues_back(
    backend: LocalBackend, app: Any, env: dict[str, str], database_url: str
) -> None:
    backend.scale(SERVICE, 1)
    (worker,) = backend.workers(SERVICE)
    poll_until(lambda: consumed(app, worker.name) == ["io_intensive"], "the worker consuming")
    assert backend.reconcile() == []  # adoption check: a consuming worker is left as it is
    # As if the scaler died between a drain's cancel and its stop: the worker runs, takes nothing.
    app.control.cancel_consumer("io_intensive", destination=[worker.name], reply=True)
    poll_until(lambda: consumed(app, worker.name) == [], "the cancel to take effect")

    # A restarted scaler adopts the worker from its pidfile and checks its consumers.
    fresh = LocalBackend(app=app, workdir=backend.workdir, env=env, grace_s=20.0)
    fresh.manage([ServiceSpec(SERVICE, ("io_intensive",))])
    assert fresh.replicas(SERVICE) == 1  # the process table cannot tell
    events = fresh.reconcile()

    assert [(e.service, e.kind) for e in events] == [(SERVICE, "consumers-restored")], events
    assert worker.name in events[0].detail
    poll_until(lambda: consumed(app, worker.name) == ["io_intensive"], "consuming again")
    assert fresh.reconcile() == []  # checked once, on adoption
    task = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.1})
    task.get(timeout=30)
    assert effects(database_url, [task.id]) == {task.id: 1}


# -- a worker that crashes on start: restarts back off --------------------------------------------

CRASH_DELAYS = (2.0, 4.0)  # base and cap of the test's backoff, short to keep the test short


def crash_loop_delays(events: list[tuple[float, BackendEvent]]) -> list[float]:
    """The delays the crash-loop events announced, in order."""
    return [
        float(e.detail.rsplit("next start in ", 1)[1].split()[0])
        for _, e in events
        if e.kind == "crash-loop"
    ]


def test_a_worker_crashing_on_start_is_restarted_with_backoff_and_reset_once_healthy(
    app: Any, env: dict[str, str], tmp_path: Path
) -> None:
    backoff = RestartBackoff(
        crash_window_s=8.0, base_delay_s=CRASH_DELAYS[0], max_delay_s=CRASH_DELAYS[1]
    )
    # A worker that exits at once: celery cannot import its app module (exit code 2).
    crashing = LocalBackend(
        app=app, workdir=tmp_path / "workers", env=env, grace_s=10.0,
        app_module="cst_no_such_module", restart_backoff=backoff,
    )  # fmt: skip
    crashing.manage([ServiceSpec(SERVICE, ("io_intensive",))])
    try:
        assert crashing.scale(SERVICE, 1).after == 1
        seen: list[tuple[float, BackendEvent]] = []
        # Until the backoff has reached its cap (two crash-loop delays), however long a crash
        # takes on a loaded machine (a worker's start is slower then; a fixed window missed it).
        deadline = time.monotonic() + 90.0
        held_checked = False
        while len(crash_loop_delays(seen)) < 2:
            assert time.monotonic() < deadline, [e for _, e in seen]
            seen += [(time.monotonic(), e) for e in crashing.reconcile()]
            if not held_checked and crash_loop_delays(seen):
                # While the backoff runs, a scale-up starts nothing either.
                held = crashing.scale(SERVICE, 1)
                assert (held.before, held.after, held.started) == (0, 0, ())
                assert crashing.health().extra["crash_loop"][SERVICE]["crashes"] == 2
                held_checked = True
            time.sleep(0.2)  # the loop's reconcile interval, not a synchronisation
        replaced = [t for t, e in seen if e.kind == "replaced"]
        # Without backoff a crashing worker is replaced at every reconcile after it dies: here
        # once at once, then once per crash-loop delay (2 s, then 4 s, the cap).
        assert 2 <= len(replaced) <= 1 + len(crash_loop_delays(seen)), [e for _, e in seen]
        assert held_checked
        delays = crash_loop_delays(seen)
        assert delays[:2] == list(CRASH_DELAYS), delays
        assert all(d <= CRASH_DELAYS[1] for d in delays)
        # Each replacement after a crash-loop event waited out that event's delay.
        for at, event in seen:
            if event.kind == "crash-loop":
                delay = crash_loop_delays([(at, event)])[0]
                after = [t for t in replaced if t > at]
                if after:
                    assert after[0] - at >= delay - 0.5, (delay, after[0] - at)

        # Fixed: the next replacement runs a healthy worker; once it outlives the crash window
        # the backoff resets (status shows no crash loop any more).
        crashing.app_module = "services.celery_app"

        def recovered() -> bool:
            crashing.reconcile()
            return crashing.replicas(SERVICE) == 1 and "crash_loop" not in crashing.health().extra

        poll_until(recovered, "a healthy replacement outliving the crash window", 40, 0.2)
        (worker,) = crashing.workers(SERVICE)
        poll_until(lambda: worker.name in ping_names(app), "the healthy worker answering ping")
    finally:
        crashing.stop_all(timeout_s=10.0)


def successes(redis_url: str, prefix: str, task_ids: list[str]) -> dict[str, int]:
    """How many times each task ran to success (the workers' success records)."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(f"{prefix}task_successes", 0, -1)
    finally:
        client.close()
    runs = dict.fromkeys(task_ids, 0)
    for item in raw:  # type: ignore[union-attr]
        task_id = json.loads(item).get("task_id")
        if task_id in runs:
            runs[task_id] += 1
    return runs


def test_a_frozen_worker_is_replaced_and_its_task_runs_once(
    app: Any, env: dict[str, str], tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """SIGSTOP of a busy worker's whole process group: its heartbeat file goes stale, it does
    not answer a ping, so it is stopped (SIGKILL past the grace period), its unacked task is
    restored and a replacement runs it, once."""
    backend = LocalBackend(
        app=app,
        workdir=tmp_path / "workers",
        env={**env, "WORKER_HEARTBEAT_INTERVAL": "0.3"},
        grace_s=1.0,
    )
    backend.restorer = UnackedRestorer.for_app(app)
    backend.manage([ServiceSpec(SERVICE, ("io_intensive",), unresponsive_after_s=2.0)])
    try:
        backend.scale(SERVICE, 1)
        (victim,) = backend.workers(SERVICE)
        poll_until(lambda: victim.name in ping_names(app), "the worker answering ping")
        task = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 3.0})
        poll_until(lambda: active_on(app, task.id), "the task to start")
        os.killpg(int(victim.ident), signal.SIGSTOP)  # the worker and its pool: frozen
        assert backend.reconcile() == [], "a fresh heartbeat: nothing to do yet"
        events: list[BackendEvent] = []

        def replaced() -> bool:
            events.extend(backend.reconcile())
            return any(e.kind == "replaced-unresponsive" for e in events)

        poll_until(replaced, "the frozen worker to be replaced", timeout_s=30)
        detail = next(e.detail for e in events if e.kind == "replaced-unresponsive")
        assert "no answer" in detail and "SIGKILL" in detail, detail
        assert any(e.kind == "restored" and victim.name in e.detail for e in events), events
        assert (
            not psutil.pid_exists(int(victim.ident))
            or psutil.Process(int(victim.ident)).status() == psutil.STATUS_ZOMBIE
        )
        (replacement,) = backend.workers(SERVICE)
        assert replacement.ident != victim.ident and replacement.state == "running"
        poll_until(lambda: effects(database_url, [task.id]) == {task.id: 1}, "the task's effect")
        prefix = env["CELERY_KEY_PREFIX"]
        # The success record follows the effect (task_success, after the commit): poll for it.
        poll_until(lambda: successes(redis_url, prefix, [task.id]) == {task.id: 1}, "one success")
    finally:
        backend.stop_all(timeout_s=10.0)
