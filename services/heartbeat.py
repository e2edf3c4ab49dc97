"""The worker's heartbeat file: touched by the worker's main process while it consumes tasks.

A container healthcheck that reads a file's age costs nothing, unlike ``celery inspect ping``
(a Python start and a broker round trip per probe, multiplied by every replica). This is a
*consumer* bootstep, so it starts once the task consumer is up and stops when the consumer stops
(broker connection lost, shutdown): a stale file means "not consuming", which is what a
healthcheck should report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


def touch(path: Path) -> None:
    """Create the file or bump its mtime; failures are logged (the healthcheck will notice)."""
    try:
        path.touch(exist_ok=True)
    except OSError:
        log.exception("could not touch heartbeat file %s", path)


class HeartbeatFile(bootsteps.StartStopStep):
    """Touches WORKER_HEARTBEAT_FILE when consuming starts and every interval after that."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        settings = parent.app.settings
        self.path: Path | None = settings.worker_heartbeat_file
        self.interval: float = settings.worker_heartbeat_interval
        self.tref: Any = None

    def include_if(self, parent: Any) -> bool:
        return self.path is not None

    def start(self, parent: Any) -> None:
        assert self.path is not None
        touch(self.path)
        self.tref = parent.timer.call_repeatedly(self.interval, touch, (self.path,))

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop
