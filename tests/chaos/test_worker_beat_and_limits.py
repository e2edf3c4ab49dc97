"""Beat killed and restarted (no double dispatch), and a setup that would run tasks twice refused.

Beat keeps its last-run times in a schedule file on disk, as on a volume. Every dispatch carries
the ``enqueued_at`` header (services.publishing), so the gaps between one entry's dispatches are
read from the queue itself: a double dispatch is a gap much shorter than the entry's period.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from chaos_environment import ChaosEnv
from chaos_figures import Figures
from chaos_processes import ROOT, BeatProcess
from support.polling import poll_until

from services.schedule import HEALTH_TASK

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

PERIOD_S = 6.0
# Beat dispatches an interval entry within a few ms of its period; a restarted beat that resends
# at once shows a gap of its start-up time (about 2 s here).
SHORTEST_GAP_S = PERIOD_S - 0.5


def dispatch_times(chaos: ChaosEnv, task_name: str) -> list[float]:
    """enqueued_at of every waiting message of one task on the priority queue, sorted."""
    client = redis.Redis.from_url(chaos.broker_url)
    try:
        times = []
        for key in client.scan_iter(match=f"{chaos.key_prefix}{chaos.queue('priority')}*"):
            if client.type(key) != b"list":
                continue
            for raw in cast(list[bytes], client.lrange(key, 0, -1)):
                message = json.loads(raw)
                if message["headers"]["task"] == task_name:
                    times.append(float(message["headers"]["enqueued_at"]))
        return sorted(times)
    finally:
        client.close()


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGKILL"])
def test_beat_killed_and_restarted_does_not_double_dispatch(
    make_env: Any, tmp_path: Path, figures: Figures, stop_signal: str
) -> None:
    sig = signal.Signals[stop_signal]
    figures.broker = "redis"
    figures.scenario = f"beat_{stop_signal.lower()}_and_restart_no_double_dispatch"
    figures.fault = f"{stop_signal} to beat right after a dispatch, restarted at once"
    figures.recovery_means = f"shortest gap between two dispatches of the {PERIOD_S:g} s entry"
    chaos: ChaosEnv = make_env("redis")
    chaos.env["HEALTH_CHECK_INTERVAL"] = str(PERIOD_S)
    schedule = tmp_path / "beat-schedule"
    log = tmp_path / "beat.log"

    beat = BeatProcess(chaos.env, schedule, log)
    try:
        poll_until(lambda: len(dispatch_times(chaos, HEALTH_TASK)) >= 1, "the first dispatch", 20)
        beat.stop(sig)
    finally:
        beat.cleanup()
    before = len(dispatch_times(chaos, HEALTH_TASK))
    beat = BeatProcess(chaos.env, schedule, log)
    try:
        poll_until(
            lambda: len(dispatch_times(chaos, HEALTH_TASK)) >= before + 2,
            "two dispatches after the restart",
            timeout_s=3 * PERIOD_S + 10,
        )
    finally:
        beat.stop(signal.SIGTERM)
        beat.cleanup()

    times = dispatch_times(chaos, HEALTH_TASK)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    figures.recovery_s = round(min(gaps), 2)
    figures.count(sent=len(times), done=len(times), lost=0, duplicated=0)
    figures.notes.append("gaps between dispatches (s): " + ", ".join(f"{g:.1f}" for g in gaps))
    short = [g for g in gaps if g < SHORTEST_GAP_S]
    figures.duplicated_effects = len(short)
    assert not short, f"dispatched twice within one {PERIOD_S} s period: gaps {gaps}"


def test_worker_refuses_a_visibility_timeout_below_the_time_limit(
    make_env: Any, figures: Figures
) -> None:
    """A task longer than the visibility timeout would run twice on Redis: the worker refuses."""
    figures.broker = "redis"
    figures.fault = "worker started with CELERY_VISIBILITY_TIMEOUT=60 < CELERY_TASK_TIME_LIMIT=120"
    figures.recovery_means = "refused at start (exit status 2), nothing consumed"
    chaos: ChaosEnv = make_env("redis")
    env = {
        **chaos.env,
        "CELERY_VISIBILITY_TIMEOUT": "60",
        "CELERY_TASK_TIME_LIMIT": "120",
        "CELERY_TASK_SOFT_TIME_LIMIT": "100",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "services.celery_app", "worker", "-Q", "x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "CELERY_VISIBILITY_TIMEOUT='60'" in proc.stderr or "CELERY_VISIBILITY_TIMEOUT=60" in (
        proc.stderr
    ), proc.stderr
    assert "more than CELERY_TASK_TIME_LIMIT (120)" in proc.stderr
