"""The beat schedule and the three periodic tasks doing their real work."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.schedules import crontab

from services.config import PRIORITY_SEP
from services.schedule import CLEANUP_TASK, HEALTH_TASK, REPORTS_TASK, beat_schedule

ROOT = Path(__file__).resolve().parents[2]

# Runs the real beat with every entry's schedule made 1 s (same tasks, same options).
FAST_BEAT = """
import sys
from services.celery_app import app
for entry in app.conf.beat_schedule.values():
    entry["schedule"] = 1.0
app.Beat(schedule=sys.argv[1], max_interval=1, loglevel="INFO").run()
"""


def test_schedule_matches_the_seed() -> None:
    schedule = beat_schedule()
    by_task = {entry["task"]: entry for entry in schedule.values()}
    assert by_task[CLEANUP_TASK]["schedule"] == timedelta(hours=1)
    assert by_task[REPORTS_TASK]["schedule"] == crontab(hour=2, minute=0)
    assert by_task[HEALTH_TASK]["schedule"] == timedelta(minutes=5)
    assert by_task[HEALTH_TASK]["options"]["priority"] == 9
    # Due at 02:00 UTC exactly: one minute before, it is not yet due.
    daily = by_task[REPORTS_TASK]["schedule"]
    assert daily.hour == {2} and daily.minute == {0}


def test_health_check_period_follows_the_setting() -> None:
    from services.config import load_settings

    settings = load_settings({"HEALTH_CHECK_INTERVAL": "3"})
    by_task = {e["task"]: e for e in beat_schedule(settings.health_check_interval).values()}
    assert by_task[HEALTH_TASK]["schedule"] == timedelta(seconds=3)
    assert by_task[HEALTH_TASK]["options"]["expires"] == 3


@pytest.mark.slow
def test_fast_beat_enqueues_the_three_tasks(
    redis_env: Any, redis_url: str, tmp_path: Path, poll: Any
) -> None:
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    client = redis.Redis.from_url(redis_url)

    def queued() -> set[tuple[str, str, int]]:
        """(task, queue, kombu priority step) of every waiting message under the prefix."""
        found = set()
        for key in client.scan_iter(match=f"{prefix}*"):
            name = key.decode()[len(prefix) :]
            queue, _, step = name.partition(PRIORITY_SEP)
            if queue not in ("scheduled", "priority") or client.type(key) != b"list":
                continue
            for raw in client.lrange(key, 0, -1):
                found.add((json.loads(raw)["headers"]["task"], queue, int(step or 0)))
        return found

    beat = subprocess.Popen(
        [sys.executable, "-c", FAST_BEAT, str(tmp_path / "beat-schedule")],
        cwd=ROOT,
        env=redis_env.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        expected = {CLEANUP_TASK: "scheduled", REPORTS_TASK: "scheduled", HEALTH_TASK: "priority"}
        found = poll(
            lambda: (q := queued()) and {task for task, _, _ in q} == set(expected) and q,
            "beat to send all three",
        )
    finally:
        beat.terminate()
        beat.wait(10)
    for task, queue, step in found:
        assert expected[task] == queue
        if task == HEALTH_TASK:  # priority 9 is kombu's most urgent step 0 (the bare list)
            assert step == 0
        else:  # the default priority, 5, mirrored
            assert step == 4


@pytest.mark.slow
def test_periodic_tasks_do_their_work(redis_env: Any, start_worker: Any, db: Any) -> None:
    app = redis_env.app()
    marker = uuid.uuid4().hex[:8]
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO sessions (session_id, expires_at)"
            " VALUES (%s, now() - interval '1 minute'), (%s, now() + interval '1 hour')",
            (f"old-{marker}", f"live-{marker}"),
        )
    start_worker(redis_env, ["scheduled", "priority"], concurrency=2)

    cleaned = app.send_task(CLEANUP_TASK).get(timeout=30)
    assert cleaned["deleted"] >= 1 and cleaned["queue"] == "scheduled"
    with db.cursor() as cur:
        cur.execute("SELECT session_id FROM sessions WHERE session_id LIKE %s", (f"%{marker}",))
        assert cur.fetchall() == [(f"live-{marker}",)]

    health = app.send_task(HEALTH_TASK, priority=9).get(timeout=30)
    assert health["healthy"] is True and health["queue"] == "priority"
    assert {"broker", "redis", "postgres"} <= set(health["checks"])
    with db.cursor() as cur:
        cur.execute("SELECT healthy FROM health_checks WHERE task_id = %s", (health["task_id"],))
        assert cur.fetchone() == (True,)

    today = datetime.now(UTC).date().isoformat()
    report = app.send_task(REPORTS_TASK, kwargs={"day": today}).get(timeout=30)
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM task_effects WHERE created_at >= %s::date"
            " AND created_at < %s::date + 1",
            (today, today),
        )
        (expected_total,) = cur.fetchone()
        cur.execute("SELECT total, by_task FROM daily_reports WHERE report_date = %s", (today,))
        total, by_task = cur.fetchone()
    # The report's own effect row is part of the day it reports (claimed in its transaction).
    assert report["total"] == total == expected_total
    assert by_task[CLEANUP_TASK] >= 1 and by_task[HEALTH_TASK] >= 1
