"""I/O-bound tasks: mostly waiting, as on a slow external service."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import apply_once

MAX_DURATION_S = 60.0


@shared_task(bind=True, base=RecordingTask, name="tasks.io_intensive.wait")
def wait(self: RecordingTask, duration: float = 0.3, key: str | None = None) -> dict[str, Any]:
    """Wait ``duration`` seconds (the stand-in for a remote call), then record the effect."""
    if (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not 0 <= duration <= MAX_DURATION_S
    ):
        raise ValueError(f"duration={duration!r}: expected seconds from 0 to {MAX_DURATION_S:g}")
    started = time.monotonic()
    time.sleep(duration)
    waited = time.monotonic() - started
    return apply_once(
        self.service.db,
        self.context(),
        self.name,
        lambda _: {"key": key, "duration": duration, "waited_s": round(waited, 3)},
    )
