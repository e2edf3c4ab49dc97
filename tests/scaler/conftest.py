"""Fixtures the scaler's suites share: one migrated database and worker environment per module
(under a key prefix of its own) and the service app on it, and the HTTP servers of the API
suites. A module that needs something else defines its own fixture of the name, which wins."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from scaler_support import ServerFactory, migrate, service_app, worker_env

from scaler.api import ScalerHTTPServer
from scaler.metrics import ScalerMetrics


@pytest.fixture(scope="module")
def env(redis_url: str, database_url: str, key_prefix: str) -> dict[str, str]:
    migrate(database_url)
    return worker_env(redis_url, database_url, f"{key_prefix}{uuid.uuid4().hex[:8]}:")


@pytest.fixture(scope="module")
def app(env: dict[str, str]) -> Iterator[Any]:
    app = service_app(env)
    yield app
    app.close()


@pytest.fixture
def serve(request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    """Start API servers on free ports; stopped after the test. The module's ``TOKEN`` is the
    control token and its ``SERVE_DEFAULTS`` other defaults; a call's arguments win."""
    started: list[ScalerHTTPServer] = []
    defaults: dict[str, Any] = {
        "status": lambda: {"cycle": 7},
        "control": None,
        "token": getattr(request.module, "TOKEN", None),
        **getattr(request.module, "SERVE_DEFAULTS", {}),
    }

    def make(**kwargs: Any) -> ScalerHTTPServer:
        kwargs = {**defaults, "metrics": ScalerMetrics(), **kwargs}
        server = ScalerHTTPServer(host="127.0.0.1", port=0, **kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
