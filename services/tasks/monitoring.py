"""The health check (every 5 minutes from beat, on the priority queue at priority 9)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import shared_task
from psycopg2.extras import Json

from services.base_task import RecordingTask
from services.effects import Cursor, apply_once


def probe(check: Callable[[], object]) -> dict[str, Any]:
    """Run one check: ok, latency in ms, and the error if it failed."""
    started = time.monotonic()
    try:
        check()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 2)}


@shared_task(bind=True, base=RecordingTask, name="tasks.monitoring.health_check")
def health_check(self: RecordingTask) -> dict[str, Any]:
    """Probe the broker, Redis and PostgreSQL; record the result in health_checks."""
    service = self.service

    def broker() -> None:
        with service.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)

    def postgres() -> None:
        with service.db.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    checks = {
        "broker": probe(broker),
        "redis": probe(service.recorder.client.ping),
        "postgres": probe(postgres),
    }
    healthy = all(check["ok"] for check in checks.values())
    context = self.context()

    def record(cur: Cursor) -> dict[str, Any]:
        cur.execute(
            "INSERT INTO health_checks (task_id, hostname, healthy, details)"
            " VALUES (%s, %s, %s, %s)",
            (context["task_id"], context["hostname"], healthy, Json(checks)),
        )
        return {"healthy": healthy, "checks": checks}

    return apply_once(service.db, context, self.name, record)
