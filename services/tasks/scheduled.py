"""Scheduled-queue tasks: jobs that run at a time rather than on demand."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import apply_once


@shared_task(bind=True, base=RecordingTask, name="tasks.scheduled.run_job")
def run_job(self: RecordingTask, job: str = "nightly", key: str | None = None) -> dict[str, Any]:
    """Record that the named job ran."""
    if not isinstance(job, str) or not job:
        raise ValueError(f"job={job!r}: expected a non-empty job name")
    return apply_once(
        self.service.db, self.context(), self.name, lambda _: {"job": job, "key": key}
    )
