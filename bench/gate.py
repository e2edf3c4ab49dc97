"""The engine gate for a benchmark's Compose project, served in this process.

The Compose backend reaches the engine only through the gate (docs/gate.md), as in the stack:
``with compose_gate(project) as clients: ComposeBackend(project, app, client_factory=clients)``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from scaler.backends.engine import ClientFactory, default_client_factory
from scaler.gate.app import Settings
from scaler.gate.background import BackgroundGate
from scaler.gate.rules import PROJECT_LABEL, Scope


@contextlib.contextmanager
def compose_gate(project: str, snapshot: bool = True) -> Iterator[ClientFactory]:
    """A gate for ``project`` on this host's engine (keeping its snapshot of the managed
    containers unless told); yields the backend's client factory."""
    host = os.environ.get("DOCKER_HOST", "")
    token = secrets.token_hex(16)
    settings = Settings(
        scope=Scope(PROJECT_LABEL, project),
        token=token,
        docker_host=host if host.startswith("unix://") else None,
        snapshot=snapshot,
    )
    with BackgroundGate(settings) as gate:
        yield default_client_factory(gate.url, token=token)
