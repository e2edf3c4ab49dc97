"""One Docker engine connection with the retry rule both container backends follow.

Transient errors (connection refused, timeouts, a 5xx) are retried with a doubling backoff and
then raised as BackendError; client errors (4xx: not found, conflict) are raised at once. A call
that changes something passes its action's fence, checked before each attempt: an action
outlives neither its leadership nor its lease generation (scaler.fencing).

With a gate token configured (``SCALER_GATE_TOKEN_FILE``, a file holding it, else
``SCALER_GATE_TOKEN``) the clients speak to the engine gate (``python -m scaler.gate``,
docs/gate.md): its pinned API version, and ``Authorization: Bearer <token>`` on every request.
Without one they speak to the engine (or a proxy) as the environment says.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from scaler.backends.base import BackendError
from scaler.fencing import Fence

T = TypeVar("T")
ClientFactory = Callable[[], docker.DockerClient]
TRANSIENT = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
# The gate's API version (scaler.gate.engine.API_VERSION): given, so that the SDK does not ask
# /version while constructing the client, before the token header is set (the gate: 401).
GATE_API_VERSION = "1.41"
TOKEN_FILE_ENV = "SCALER_GATE_TOKEN_FILE"
TOKEN_ENV = "SCALER_GATE_TOKEN"


def gate_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The gate's bearer token from the environment (the file first); None when none is set."""
    path = env.get(TOKEN_FILE_ENV)
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"{TOKEN_FILE_ENV}={path}: the file is empty")
        return token
    return env.get(TOKEN_ENV) or None


def default_client_factory(
    docker_host: str | None = None, timeout_s: int = 30, token: str | None = None
) -> ClientFactory:
    """Clients for ``docker_host``, else the environment's (DOCKER_HOST, else the socket); with a
    gate ``token`` (else the environment's, see ``gate_token``), clients of the engine gate."""

    def make() -> docker.DockerClient:
        bearer = token if token is not None else gate_token()
        version = GATE_API_VERSION if bearer else None
        if docker_host:
            client = docker.DockerClient(base_url=docker_host, version=version, timeout=timeout_s)
        else:
            client = docker.from_env(version=version, timeout=timeout_s)
        if bearer:
            client.api.headers["Authorization"] = f"Bearer {bearer}"
        return client

    return make


class Engine:
    """A lazily opened client, its retry rule, and the last error (for health)."""

    def __init__(self, factory: ClientFactory, *, attempts: int = 3, backoff_s: float = 0.2):
        if attempts < 1:
            raise ValueError(f"attempts={attempts!r}: expected at least 1")
        if backoff_s <= 0:
            raise ValueError(f"backoff_s={backoff_s!r}: expected a positive number of seconds")
        self.factory = factory
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.last_error = ""
        self._client: docker.DockerClient | None = None

    def call(
        self, what: str, fn: Callable[[docker.DockerClient], T], fence: Fence | None = None
    ) -> T:
        """Run one engine call under the retry rule; BackendError naming ``what`` at the end."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            if fence is not None:
                fence.check(what)
            try:
                if self._client is None:
                    self._client = self.factory()
                result = fn(self._client)
                self.last_error = ""
                return result
            except docker.errors.APIError as exc:
                if exc.is_client_error() or attempt == self.attempts:
                    self.last_error = f"{what}: {exc}"
                    raise BackendError(self.last_error) from exc
            except TRANSIENT as exc:
                if attempt == self.attempts:
                    self.last_error = f"{what}: {type(exc).__name__}: {exc}"
                    raise BackendError(self.last_error) from exc
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def gate_call(
    client: docker.DockerClient, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One of the gate's own operations (unversioned ``/gate/v1/...``): its JSON answer, or
    docker's APIError for an error status (a 4xx is not retried by ``Engine.call``)."""
    api = client.api
    response = api.request(
        method,
        f"{api.base_url}{path}",
        data=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json"} if body is not None else None,
        timeout=api.timeout,
    )
    if response.status_code >= 400:
        try:
            message = str(response.json().get("message", ""))
        except (ValueError, AttributeError):
            message = response.text
        raise docker.errors.APIError(message, response=response, explanation=message)
    return response.json()


def gate_scope(label: str, kind: str, client_factory: ClientFactory | None = None) -> str:
    """The project or stack the engine gate serves (the scope of its ``GET /gate/v1/status``),
    which must be by ``label`` (``kind`` names it in errors). The gate is told its scope at its
    start and the scaler follows it (the scaler's own container is not a managed one: the gate
    does not let it read its labels). Raises ValueError naming what was asked and what came."""
    client = (client_factory or default_client_factory())()
    try:
        status = gate_call(client, "GET", "/gate/v1/status")
    except (docker.errors.DockerException, OSError) as exc:
        raise ValueError(f"the engine gate's status could not be read ({exc})") from None
    finally:
        client.close()
    scope = (status.get("scope") if isinstance(status, dict) else None) or {}
    if scope.get("label") != label or not scope.get("value"):
        raise ValueError(f"the engine gate serves {scope or 'no scope'}, not a {kind}")
    return str(scope["value"])
