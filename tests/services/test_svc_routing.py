"""Routing: every task family lands in its queue and is run by a worker consuming that queue."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from services.config import PRIORITY_SEP

EXPECTED_QUEUE = {
    "tasks.default.record": "default",
    "tasks.cpu_intensive.count_primes": "cpu_intensive",
    "tasks.io_intensive.wait": "io_intensive",
    "tasks.priority.expedite": "priority",
    "tasks.scheduled.run_job": "scheduled",
    "tasks.cleanup.cleanup_expired_sessions": "scheduled",
    "tasks.reports.generate_daily_reports": "scheduled",
    "tasks.monitoring.health_check": "priority",
    "tasks.something.else": "default",
}


def queued_task_names(client: redis.Redis, prefix: str, queue: str) -> list[str]:
    """Task names waiting in one queue, across all its priority sub-lists."""
    names = []
    for step in range(10):
        key = f"{prefix}{queue}" if step == 0 else f"{prefix}{queue}{PRIORITY_SEP}{step}"
        for raw in client.lrange(key, 0, -1):
            names.append(json.loads(raw)["headers"]["task"])
    return names


def test_every_family_is_published_to_its_queue(redis_env: Any, redis_url: str) -> None:
    app = redis_env.app()
    for name in EXPECTED_QUEUE:
        app.send_task(name, kwargs={})
    client = redis.Redis.from_url(redis_url)
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    found = {
        queue: queued_task_names(client, prefix, queue)
        for queue in ("default", "cpu_intensive", "io_intensive", "priority", "scheduled")
    }
    for name, queue in EXPECTED_QUEUE.items():
        assert name in found[queue], f"{name} not in {queue}: {found}"
    assert sum(len(names) for names in found.values()) == len(EXPECTED_QUEUE)


def test_enqueued_at_header_is_stamped(redis_env: Any, redis_url: str) -> None:
    import time

    before = time.time()
    redis_env.app().send_task("tasks.default.record", kwargs={})
    client = redis.Redis.from_url(redis_url)
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    keys = list(client.scan_iter(match=f"{prefix}default*"))
    message = json.loads(client.lindex(keys[0], -1))
    assert before <= message["headers"]["enqueued_at"] <= time.time()


@pytest.mark.slow
def test_workers_run_each_family_from_its_queue(redis_env: Any, start_worker: Any, db: Any) -> None:
    app = redis_env.app()
    start_worker(
        redis_env,
        ["default", "cpu_intensive", "io_intensive", "priority", "scheduled"],
        concurrency=2,
    )
    calls = {
        "tasks.default.record": {"key": "k1", "payload": {"a": 1}},
        "tasks.cpu_intensive.count_primes": {"size": 100, "key": "k2"},
        "tasks.io_intensive.wait": {"duration": 0.2, "key": "k3"},
        "tasks.priority.expedite": {"key": "k4"},
        "tasks.scheduled.run_job": {"job": "nightly", "key": "k5"},
    }
    results = {
        name: app.send_task(name, kwargs=kwargs).get(timeout=30) for name, kwargs in calls.items()
    }
    for name, result in results.items():
        assert result["queue"] == EXPECTED_QUEUE[name], result
        assert result["hostname"] and result["task_id"]
    assert results["tasks.cpu_intensive.count_primes"]["primes"] == 25
    assert results["tasks.default.record"]["payload"] == {"a": 1}
    assert results["tasks.io_intensive.wait"]["waited_s"] >= 0.2
    with db.cursor() as cur:
        cur.execute(
            "SELECT task_name, queue FROM task_effects WHERE task_id = ANY(%s)",
            ([r["task_id"] for r in results.values()],),
        )
        assert dict(cur.fetchall()) == {name: EXPECTED_QUEUE[name] for name in calls}


def test_enqueued_at_keeps_a_publishers_stamp_and_restamps_a_retry() -> None:
    import time

    from services.publishing import stamp_enqueued_at

    kept = {"enqueued_at": 100.0, "retries": 0}
    stamp_enqueued_at(headers=kept)
    assert kept["enqueued_at"] == 100.0
    retried = {"enqueued_at": 100.0, "retries": 1}
    before = time.time()
    stamp_enqueued_at(headers=retried)
    assert retried["enqueued_at"] >= before
