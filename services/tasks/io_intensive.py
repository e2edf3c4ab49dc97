"""I/O-bound tasks: mostly waiting, as on a slow external service."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import apply_once

MAX_DURATION_S = 60.0


@shared_task(bind=True, base=RecordingTask, name="tasks.io_intensive.wait", record_starts=True)
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


MAX_ALLOCATE_MB = 4096
_CHUNK_MB = 32


@shared_task(bind=True, base=RecordingTask, name="tasks.io_intensive.allocate", record_starts=True)
def allocate(
    self: RecordingTask, megabytes: int = 64, hold_s: float = 0.5, key: str | None = None
) -> dict[str, Any]:
    """Hold ``megabytes`` MB of touched memory for ``hold_s`` seconds, then record the effect.

    For chaos tests of a worker killed by its container's memory limit (the OOM killer): on the
    task's first delivery it allocates; on a redelivery (``redelivered`` set by a restore) it runs
    light, so a restored task does not kill its next worker too.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, int):
        raise ValueError(f"megabytes={megabytes!r}: expected a whole number")
    if not 0 <= megabytes <= MAX_ALLOCATE_MB:
        raise ValueError(f"megabytes={megabytes!r}: expected 0 to {MAX_ALLOCATE_MB}")
    if isinstance(hold_s, bool) or not isinstance(hold_s, int | float) or not 0 <= hold_s <= 60:
        raise ValueError(f"hold_s={hold_s!r}: expected seconds from 0 to 60")
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    held: list[bytes] = []
    if not redelivered:
        for _ in range(0, megabytes, _CHUNK_MB):
            held.append(b"\x01" * (_CHUNK_MB * 1024 * 1024))  # written, so resident
    time.sleep(hold_s)
    size = sum(map(len, held)) // (1024 * 1024)
    held.clear()
    return apply_once(
        self.service.db,
        self.context(),
        self.name,
        lambda _: {"key": key, "megabytes": size, "redelivered": redelivered},
    )
