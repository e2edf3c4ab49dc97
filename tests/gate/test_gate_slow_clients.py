"""The gate's header-read deadline (scaler.http_limits, shared with the scaler's API), in raw
sockets against a gate in front of the real engine: a client trickling its request head a byte a
second is answered 408 and closed within the deadline while other clients are served; an idle
keep-alive connection is not (its deadline starts at a request's first byte)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from gate_support import TOKEN, GateServer, request

from scaler.gate.app import Settings
from scaler.gate.rules import PROJECT_LABEL, Scope
from scaler.gate.serve import KEEP_ALIVE_S, LIMIT_PER_CLIENT, READ_TIMEOUT_S

pytestmark = pytest.mark.docker

DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def gate() -> Iterator[GateServer]:
    """A gate of a project with no container (only /_ping reaches the engine)."""
    try:
        probe = request_engine_ping()
    except OSError as exc:
        pytest.skip(f"needs a Docker engine: {exc}")
    assert probe
    settings = Settings(scope=Scope(PROJECT_LABEL, "cst-test-gate-slow"), token=TOKEN)
    with GateServer(settings, read_timeout_s=DEADLINE_S) as server:
        yield server


def request_engine_ping() -> bool:
    import docker

    try:
        client = docker.from_env(timeout=10)
        return bool(client.ping())
    except docker.errors.DockerException as exc:
        raise OSError(str(exc)) from exc


HEAD = f"GET /_ping HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()


def test_the_production_settings() -> None:
    assert READ_TIMEOUT_S == 10.0 and LIMIT_PER_CLIENT >= 128 and KEEP_ALIVE_S >= 60


def test_a_head_trickled_a_byte_a_second_is_closed_within_the_deadline_and_ping_answers(
    gate: GateServer,
) -> None:
    closed: list[float] = []
    received = bytearray()
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=30)
    started = time.monotonic()

    def trickle() -> None:
        try:
            for byte in HEAD:
                sock.sendall(bytes([byte]))
                sock.settimeout(1.0)  # a byte a second, reading whatever the gate says
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                received.extend(data)
                if not data:
                    break
        except OSError:
            pass  # reset by the gate
        closed.append(time.monotonic() - started)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        # While the trickler holds its connection, others are served (several times over the
        # whole deadline, each a new connection).
        served = 0
        while not closed:
            assert time.monotonic() - started < DEADLINE_S + 5, "the trickler was not closed"
            answer = request(gate.port, "GET", "/_ping", timeout_s=5)
            assert answer.status == 200 and answer.body == b"OK"
            served += 1
        trickler.join(5)
    finally:
        sock.close()
    assert served >= 2
    assert DEADLINE_S - 0.2 <= closed[0] <= DEADLINE_S + 1.5, closed
    assert len(HEAD) > DEADLINE_S + 3  # it was still sending its head
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {
        "message": f"request not received within {DEADLINE_S:g} s of its first byte"
    }
    assert gate.server.servers  # still serving
    assert request(gate.port, "GET", "/_ping").status == 200


def test_a_body_trickled_past_the_deadline_gets_408_and_nothing_is_created(
    gate: GateServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"service": "worker-x", "number": 5}).encode()
    head = (
        f"POST /gate/v1/replicas HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    counted = request(gate.port, "GET", "/gate/v1/status").json()
    served_before, slow_before = counted["served"], counted["refused"].get("slow-body", 0)
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(head + body[:3])
        sock.settimeout(DEADLINE_S + 3)
        data = sock.recv(4096)
        took = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took <= DEADLINE_S + 1.5
    # The handler never ran; the gate counted a slow body, and logged no error.
    deadline = time.monotonic() + 5
    while True:
        counted = request(gate.port, "GET", "/gate/v1/status").json()
        if counted["refused"].get("slow-body", 0) == slow_before + 1:
            break
        assert time.monotonic() < deadline, counted
        time.sleep(0.05)
    replicas = "POST /gate/v1/replicas"
    assert counted["served"].get(replicas) == served_before.get(replicas)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_an_idle_keep_alive_connection_outlives_the_deadline_and_serves_its_next_request(
    gate: GateServer,
) -> None:
    """The scaler's client keeps its connections for its next cycle: the deadline starts at a
    request's first byte, not at the previous response."""
    conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=10)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        conn.request("GET", "/_ping", headers=headers)
        first = conn.getresponse()
        assert first.status == 200 and first.read() == b"OK"
        sock = conn.sock
        idle_until = time.monotonic() + DEADLINE_S + 1.0
        while time.monotonic() < idle_until:  # idle past one deadline
            time.sleep(0.1)
        conn.request("GET", "/_ping", headers=headers)
        second = conn.getresponse()
        assert second.status == 200 and second.read() == b"OK"
        assert conn.sock is sock  # the same connection
    finally:
        conn.close()
