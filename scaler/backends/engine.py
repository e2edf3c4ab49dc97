"""One Docker engine connection with the retry rule both container backends follow.

Transient errors (connection refused, timeouts, a 5xx) are retried with a doubling backoff and
then raised as BackendError; client errors (4xx: not found, conflict) are raised at once. A call
that changes something passes its action's fence, checked before each attempt: an action
outlives neither its leadership nor its lease generation (scaler.fencing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import docker
import docker.errors
import requests.exceptions

from scaler.backends.base import BackendError
from scaler.fencing import Fence

T = TypeVar("T")
ClientFactory = Callable[[], docker.DockerClient]
TRANSIENT = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def default_client_factory(docker_host: str | None = None, timeout_s: int = 30) -> ClientFactory:
    """Clients for ``docker_host``, else the environment's (DOCKER_HOST, else the socket)."""

    def make() -> docker.DockerClient:
        if docker_host:
            return docker.DockerClient(base_url=docker_host, timeout=timeout_s)
        return docker.from_env(timeout=timeout_s)

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
