"""Task effects in PostgreSQL, applied once per task id however often the task is delivered.

Late acks mean a task can be delivered twice (a worker killed after the work, before the ack). The
effect is therefore claimed by inserting the task's row in ``task_effects`` first, in the same
transaction as the work: a second delivery's insert waits on the first's row lock, finds the row
committed, and returns the stored result instead of doing the work again. If the first attempt
rolls back, the row disappears with it and the next delivery does the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2.extensions
from psycopg2.extras import Json

from services.db import DatabasePool

Cursor = psycopg2.extensions.cursor
Work = Callable[[Cursor], dict[str, Any]]


def apply_once(
    pool: DatabasePool, context: dict[str, str], task_name: str, work: Work
) -> dict[str, Any]:
    """Run ``work`` in a transaction that also records the task's effect; once per task id.

    ``context`` carries task_id, hostname and queue (RecordingTask.context()). The result is the
    context plus what ``work`` returns; a duplicate delivery gets the first run's result with
    ``"duplicate": True``.
    """
    task_id = context["task_id"]
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO task_effects (task_id, task_name, queue, hostname, payload)"
            " VALUES (%s, %s, %s, %s, '{}'::jsonb)"
            " ON CONFLICT (task_id) DO NOTHING RETURNING task_id",
            (task_id, task_name, context["queue"], context["hostname"]),
        )
        if cur.fetchone() is None:
            cur.execute("SELECT payload FROM task_effects WHERE task_id = %s", (task_id,))
            row = cur.fetchone()
            stored: dict[str, Any] = dict(row[0]) if row else {}
            return {**stored, "duplicate": True}
        result = {**context, **work(cur)}
        cur.execute(
            "UPDATE task_effects SET payload = %s WHERE task_id = %s", (Json(result), task_id)
        )
        return result
