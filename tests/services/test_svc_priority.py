"""Priority order on both brokers: 9 is served first, with one worker at concurrency 1."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg2.extensions
import pytest

pytestmark = pytest.mark.slow

# Enqueued in this order (low first), while no worker runs.
SENT = [1, 1, 5, 9, 1, 9, 5, 0, 9]


def execution_order(db: psycopg2.extensions.connection, task_ids: list[str]) -> list[str]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT task_id FROM task_effects WHERE task_id = ANY(%s) ORDER BY created_at",
            (task_ids,),
        )
        return [row[0] for row in cur.fetchall()]


def run_priority_order(
    service: Any, start_worker: Callable[..., Any], db: Any, poll: Callable[..., Any]
) -> None:
    app = service.app()
    ids: dict[str, int] = {}
    for priority in SENT:
        task_id = str(uuid.uuid4())
        app.send_task(
            "tasks.priority.expedite",
            kwargs={"key": f"p{priority}"},
            task_id=task_id,
            priority=priority,
        )
        ids[task_id] = priority
    start_worker(service, ["priority"], concurrency=1, ready=False)
    order = poll(
        lambda: (o := execution_order(db, list(ids))) and len(o) == len(ids) and o,
        "all priority tasks done",
        timeout_s=60,
    )
    priorities_in_order = [ids[task_id] for task_id in order]
    assert priorities_in_order == sorted(SENT, reverse=True)


def test_priority_order_on_redis(redis_env: Any, start_worker: Any, db: Any, poll: Any) -> None:
    run_priority_order(redis_env, start_worker, db, poll)


def test_priority_order_on_rabbitmq(amqp_env: Any, start_worker: Any, db: Any, poll: Any) -> None:
    run_priority_order(amqp_env, start_worker, db, poll)
