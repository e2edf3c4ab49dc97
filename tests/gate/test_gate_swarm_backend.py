"""The Swarm backend's count change and stack lookup through the real gate, over a recorded engine.

The backend sends no spec: it asks the gate's scale operation with the version it listed, and the
gate posts the spec as stored with only the count changed (issue 24). No swarm here: the engine
behind the gate answers from a table and records what the gate asked. tests/swarm/ runs the same
against real engines (test_count_change.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from gate_support import TOKEN, GateServer, free_port

from scaler.backends.base import BackendError
from scaler.backends.engine import default_client_factory
from scaler.backends.swarm import SwarmBackend, SwarmService, own_stack
from scaler.fencing import UNFENCED
from scaler.gate.app import Settings
from scaler.gate.engine import Engine
from scaler.gate.rules import MANAGED_LABEL, PROJECT_LABEL, STACK_LABEL, Scope

STACK = "st"
# A stack-deployed service as a newer CLI leaves it: no DNSConfig, no RestartPolicy.Delay, no
# UpdateConfig.Monitor, no RollbackConfig; a null inside, and a non-ASCII label value.
SPEC: dict[str, Any] = {
    "Name": "st_worker-io",
    "Labels": {MANAGED_LABEL: "true", STACK_LABEL: STACK, "note": "café"},
    "TaskTemplate": {
        "ContainerSpec": {
            "Image": "celery-stack/app:1",
            "Privileges": {"CredentialSpec": None, "SELinuxContext": None},
            "Init": True,
        },
        "RestartPolicy": {"Condition": "on-failure", "MaxAttempts": 0},
        "Networks": [{"Target": "n1", "Aliases": ["worker-io"]}],
        "ForceUpdate": 0,
        "Runtime": "container",
    },
    "Mode": {"Replicated": {"Replicas": 1}},
    "UpdateConfig": {"Parallelism": 1, "Order": "start-first"},
    "EndpointSpec": {"Mode": "vip"},
}


class StoredEngine(Engine):
    """One managed service at a version; records what the gate asks and applies its updates."""

    def __init__(self, version: int) -> None:
        super().__init__("unix:///nonexistent")
        self.version = version
        self.spec = copy.deepcopy(SPEC)
        self.calls: list[tuple[str, str, dict[str, Any], Any]] = []
        self.update_answer: tuple[int, bytes] | None = None

    async def call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = 30.0,
    ) -> tuple[int, bytes]:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        self.calls.append((method, path, params, copy.deepcopy(body)))
        if method == "GET" and path in ("/services/svc-id", "/services/st_worker-io"):
            row = {"ID": "svc-id", "Version": {"Index": self.version}, "Spec": self.spec}
            return 200, json.dumps(row).encode()
        if (method, path) == ("POST", "/services/svc-id/update"):
            if self.update_answer is not None:
                return self.update_answer
            self.spec, self.version = copy.deepcopy(body), self.version + 1
            return 200, b'{"Warnings":null}'
        return 404, b'{"message":"not found"}'

    def posts(self) -> list[tuple[str, str, dict[str, Any], Any]]:
        return [c for c in self.calls if c[0] == "POST"]


@pytest.fixture
def engine() -> StoredEngine:
    return StoredEngine(version=7)


@pytest.fixture
def gate(engine: StoredEngine) -> Iterator[GateServer]:
    settings = Settings(scope=Scope(STACK_LABEL, STACK), token=TOKEN)
    with GateServer(settings, engine) as server:
        yield server


def backend(gate: GateServer) -> SwarmBackend:
    return SwarmBackend(STACK, Celery(set_as_current=False), client_factory=gate.clients(),
                        attempts=1)  # fmt: skip


def test_the_count_goes_through_the_gates_scale_with_the_listed_version(
    gate: GateServer, engine: StoredEngine
) -> None:
    b = backend(gate)
    try:
        b._update(SwarmService("svc-id", "st_worker-io", 7, 1, ()), 3, UNFENCED)
    finally:
        b.close()
    ((_, path, params, body),) = engine.posts()
    assert (path, params) == ("/services/svc-id/update", {"version": 7})
    # The spec as stored, only the count changed: nothing filled in, nothing left out, the
    # non-ASCII value and the nulls as they were.
    assert body == {**SPEC, "Mode": {"Replicated": {"Replicas": 3}}}
    assert engine.version == 8


def test_a_service_changed_since_the_listing_is_not_overwritten(
    gate: GateServer, engine: StoredEngine
) -> None:
    engine.version = 8  # changed by someone else after the backend listed version 7
    b = backend(gate)
    try:
        with pytest.raises(BackendError, match=r"changed since it was read.*next cycle reads"):
            b._update(SwarmService("svc-id", "st_worker-io", 7, 1, ()), 3, UNFENCED)
        assert engine.posts() == []
        # The engine's own conflict (the version moved between the gate's read and its post).
        engine.version = 7
        engine.update_answer = (500, b'{"message":"rpc error: update out of sequence"}')
        with pytest.raises(BackendError, match="changed since it was read"):
            b._update(SwarmService("svc-id", "st_worker-io", 7, 1, ()), 3, UNFENCED)
        assert len(engine.posts()) == 1 and engine.version == 7
    finally:
        b.close()


def test_the_stack_comes_from_the_gate_when_not_given(engine: StoredEngine) -> None:
    swarm = Settings(scope=Scope(STACK_LABEL, STACK), token=TOKEN)
    with GateServer(swarm, engine) as gate:
        assert own_stack(gate.clients()) == STACK
    compose = Settings(scope=Scope(PROJECT_LABEL, "proj"), token=TOKEN)
    with GateServer(compose, engine) as gate, pytest.raises(ValueError, match=r"proj.*not a Swarm"):
        own_stack(gate.clients())
    nobody = default_client_factory(f"tcp://127.0.0.1:{free_port()}", token=TOKEN)
    with pytest.raises(ValueError, match="the engine gate's status could not be read"):
        own_stack(nobody)
