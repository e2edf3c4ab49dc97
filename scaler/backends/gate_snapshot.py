"""The engine gate's snapshot of the managed containers, as the Compose backend reads it.

The gate keeps the managed containers' state from the engine's events (scaler/gate/snapshot.py)
and serves it as ``GET /gate/v1/snapshot``: one read per cycle instead of a container listing
and inspections. Each entry has the shape of an inspected container (``Id``, ``Name``,
``Config.Labels``/``Hostname``/``Cmd``..., ``State`` with ``Health.Status``, ``HostConfig``'s CPU
limit), so the backend's readers of inspected containers read it unchanged.

``read`` answers None when there is no snapshot to read (the backend then lists as before): the
gate has none yet (503: starting, or listing again after a break in its event stream), or is an
older gate without the operation (403/404: not asked again for ``retry_after_s``), or serves
another project. Connection trouble raises, as a listing's would, under the backend's retry rule.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import docker
import docker.errors

from scaler.backends.engine import gate_call

log = logging.getLogger(__name__)

PATH = "/gate/v1/snapshot"
PROJECT_LABEL = "com.docker.compose.project"


class SnapshotReader:
    """Reads the gate's snapshot for Compose project ``project`` (see the module docstring)."""

    def __init__(self, project: str, retry_after_s: float = 300.0) -> None:
        self.project = project
        self.retry_after_s = retry_after_s
        self._off_until = 0.0  # monotonic time before which the gate is not asked again
        self.reads = 0  # snapshots read (for tests and benchmarks)
        self.fallbacks = 0  # reads answered None: the backend listed instead

    def read(self, client: docker.DockerClient) -> list[dict[str, Any]] | None:
        """The managed containers as the gate keeps them; None: list them instead."""
        if time.monotonic() < self._off_until:
            self.fallbacks += 1
            return None
        try:
            answer = gate_call(client, "GET", PATH)
        except docker.errors.APIError as exc:
            if exc.status_code not in (403, 404, 405, 503):
                raise
            if exc.status_code != 503:  # an older gate: ask again later (it may be upgraded)
                self._off_until = time.monotonic() + self.retry_after_s
                log.info("the engine gate serves no %s (%s): listing containers", PATH, exc)
            self.fallbacks += 1
            return None
        scope = (answer or {}).get("scope") or {}
        if scope != {"label": PROJECT_LABEL, "value": self.project}:
            self._off_until = time.monotonic() + self.retry_after_s
            log.warning("the engine gate's snapshot is of %s, not project %r", scope, self.project)
            self.fallbacks += 1
            return None
        self.reads += 1
        return list(answer.get("containers") or [])
