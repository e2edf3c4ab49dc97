"""Priority-queue tasks: short, urgent work that should never wait behind bulk jobs."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import apply_once


@shared_task(bind=True, base=RecordingTask, name="tasks.priority.expedite")
def expedite(self: RecordingTask, key: str | None = None) -> dict[str, Any]:
    """Record an urgent item, with the priority it was delivered at."""
    delivered = (self.request.delivery_info or {}).get("priority")
    return apply_once(
        self.service.db,
        self.context(),
        self.name,
        lambda _: {"key": key, "broker_priority": delivered},
    )
