"""Helpers of the gate's tests: raw HTTP (requests the SDK would never send), the gate served in a
thread, and the engine's own view (through the socket, not the gate) to check what changed.

The scaler's suites that run the Compose backend against the real engine import this module too
(``tests.gate.gate_support``): ``project_gate`` serves a gate for their Compose project and
``GateServer.clients`` makes the backend's engine clients for it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scaler.backends.engine import ClientFactory, default_client_factory
from scaler.gate.app import Settings
from scaler.gate.background import BackgroundGate
from scaler.gate.rules import PROJECT_LABEL, Scope

TOKEN = "gate-test-token-0123456789abcdef"
# Put in the template's environment: no answer of the gate may ever contain it.
SECRET = "s3cr3t-the-gate-must-never-show-this"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> str:
        return str(self.json().get("message", ""))


def exchange(port: int, data: bytes, timeout_s: float = 30.0) -> Answer:
    """Send ``data`` as is on a new connection; the answer (secret-checked)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    assert SECRET.encode() not in answer.body, f"the secret leaked in {data[:80]!r}"
    return answer


def request(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
    content_type: str | None = "application/json",
    timeout_s: float = 30.0,
) -> Answer:
    lines = [f"{method} {target} HTTP/1.1", "Host: gate", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
        if content_type:
            lines.append(f"Content-Type: {content_type}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    return exchange(port, data, timeout_s)


def post_json(port: int, target: str, value: Any) -> Answer:
    return request(port, "POST", target, json.dumps(value).encode())


class GateServer(BackgroundGate):
    """The gate in a thread of the test process (uvicorn, h11), on a free loopback port."""

    def __enter__(self) -> GateServer:
        super().__enter__()
        return self

    def clients(self, timeout_s: int = 30) -> ClientFactory:
        """Engine clients of the scaler's backends for this gate (its version and token)."""
        return default_client_factory(self.url, timeout_s=timeout_s, token=TOKEN)


@contextlib.contextmanager
def project_gate(
    project: str,
    *,
    docker_host: str | None = None,
    allowed_bind_mounts: tuple[str, ...] = (),
    snapshot: bool = False,
) -> Iterator[GateServer]:
    """A gate for Compose project ``project`` on the engine at ``docker_host`` (else the
    environment's DOCKER_HOST when it is a socket, else the default socket), as the stack runs
    one for the scalers. Without its snapshot unless ``snapshot``: the Compose backend's suite
    (tests/scaler/test_compose_backend.py) counts the engine listings a cycle takes, which the
    snapshot replaces; tests/gate/test_gate_snapshot.py runs the backend over the snapshot."""
    if docker_host is None and os.environ.get("DOCKER_HOST", "").startswith("unix://"):
        docker_host = os.environ["DOCKER_HOST"]
    settings = Settings(
        scope=Scope(PROJECT_LABEL, project),
        token=TOKEN,
        docker_host=docker_host,
        allowed_bind_mounts=allowed_bind_mounts,
        snapshot=snapshot,
    )
    with GateServer(settings) as server:
        yield server
