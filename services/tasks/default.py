"""Default-queue tasks."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import apply_once


@shared_task(bind=True, base=RecordingTask, name="tasks.default.record")
def record(
    self: RecordingTask, key: str | None = None, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Record a caller-supplied key and payload as this task's effect."""
    if payload is not None and not isinstance(payload, dict):
        raise ValueError(f"payload={payload!r}: expected a JSON object or null")
    return apply_once(
        self.service.db, self.context(), self.name, lambda _: {"key": key, "payload": payload}
    )


@shared_task(bind=True, base=RecordingTask, name="tasks.default.fail")
def fail(self: RecordingTask, message: str = "deliberate failure") -> None:
    """Always fails: a canary for the failure path (records, alerts, dashboards)."""
    raise RuntimeError(message)
