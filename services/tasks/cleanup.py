"""Periodic cleanup (hourly, from beat)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import Cursor, apply_once


def delete_expired_sessions(cur: Cursor) -> dict[str, Any]:
    cur.execute("DELETE FROM sessions WHERE expires_at < now()")
    return {"deleted": cur.rowcount}


@shared_task(bind=True, base=RecordingTask, name="tasks.cleanup.cleanup_expired_sessions")
def cleanup_expired_sessions(self: RecordingTask) -> dict[str, Any]:
    """Delete expired sessions, in the same transaction as the task's effect row."""
    return apply_once(self.service.db, self.context(), self.name, delete_expired_sessions)
