"""No loss, no double effect: duplicate delivery, SIGKILL mid-task, warm shutdown mid-task."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

pytestmark = pytest.mark.slow


def effect_rows(db: Any, task_id: str) -> list[tuple[str, str]]:
    with db.cursor() as cur:
        cur.execute("SELECT task_id, hostname FROM task_effects WHERE task_id = %s", (task_id,))
        return cur.fetchall()


def test_duplicate_delivery_has_one_effect(
    redis_env: Any, start_worker: Any, db: Any, poll: Any
) -> None:
    app = redis_env.app()
    task_id = str(uuid.uuid4())
    # The same message (same task id) delivered twice, as late acks allow.
    for _ in range(2):
        app.send_task("tasks.default.record", kwargs={"key": "dup"}, task_id=task_id)
    worker = start_worker(redis_env, ["default"], concurrency=2)
    results = redis_env.app().AsyncResult(task_id).get(timeout=30)
    assert results["key"] == "dup"

    def both_ran() -> bool:
        return worker.log().count(f"task tasks.default.record {task_id} succeeded") == 2

    poll(both_ran, "both deliveries executed")
    assert len(effect_rows(db, task_id)) == 1


def test_sigkill_mid_task_is_redelivered_and_completed_once(
    redis_env: Any, start_worker: Any, db: Any, poll: Any, redis_url: str
) -> None:
    # Short limits so Redis redelivers within the test; the config insists vt > time limit.
    redis_env.env.update(
        CELERY_VISIBILITY_TIMEOUT="4", CELERY_TASK_TIME_LIMIT="3", CELERY_TASK_SOFT_TIME_LIMIT="2"
    )
    app = redis_env.app()
    first = start_worker(redis_env, ["io_intensive"])
    result = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 1.5, "key": "kill"})
    poll(lambda: result.state == "STARTED", "the task to start")
    first.kill()  # the whole worker, main process and child, mid-task
    assert effect_rows(db, result.id) == []

    # The message sits in kombu's unacked set until the visibility timeout has passed; a worker
    # starting after that restores it at once.
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    client = redis.Redis.from_url(redis_url)
    import time

    def overdue() -> bool:
        scores = client.zrange(f"{prefix}unacked_index", 0, -1, withscores=True)
        return bool(scores) and all(time.time() - s > 4.5 for _, s in scores)

    poll(overdue, "the unacked message to pass the visibility timeout", timeout_s=20)
    second = start_worker(redis_env, ["io_intensive"])
    done = result.get(timeout=30)
    assert done["key"] == "kill"
    rows = poll(lambda: effect_rows(db, result.id), "the effect row")
    assert len(rows) == 1
    assert second.name in done["worker"]


def test_warm_shutdown_finishes_the_running_task(
    redis_env: Any, start_worker: Any, db: Any, poll: Any
) -> None:
    app = redis_env.app()
    worker = start_worker(redis_env, ["io_intensive"])
    result = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 1.5, "key": "term"})
    poll(lambda: result.state == "STARTED", "the task to start")
    assert worker.terminate(timeout=30) == 0
    assert result.get(timeout=5)["key"] == "term"
    assert len(effect_rows(db, result.id)) == 1


def test_killed_pool_child_requeues_its_task(
    redis_env: Any, start_worker: Any, db: Any, poll: Any
) -> None:
    import os
    import signal

    app = redis_env.app()
    worker = start_worker(redis_env, ["io_intensive"])
    result = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 1.5, "key": "child"})
    poll(lambda: result.state == "STARTED", "the task to start")
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    assert result.get(timeout=30)["key"] == "child"
    assert "WorkerLostError" in worker.log()
    assert len(effect_rows(db, result.id)) == 1


def test_pickled_message_is_rejected_never_run(
    redis_env: Any, start_worker: Any, db: Any, poll: Any
) -> None:
    app = redis_env.app()
    evil_id = str(uuid.uuid4())
    with app.producer_or_acquire() as producer:
        producer.publish(
            [[], {"key": "pickled"}, {}],
            serializer="pickle",
            routing_key=redis_env.queue("default"),
            exchange="",
            headers={"task": "tasks.default.record", "id": evil_id, "lang": "py"},
        )
    worker = start_worker(redis_env, ["default"])
    ok = app.send_task("tasks.default.record", kwargs={"key": "after"}).get(timeout=30)
    assert ok["key"] == "after"
    poll(lambda: "ContentDisallowed" in worker.log() or "disallowed" in worker.log(), "refusal")
    assert effect_rows(db, evil_id) == []
