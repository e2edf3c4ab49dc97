"""The gate's Swarm operations against a recorded engine (no swarm here): what it asks the engine,
with which body, and what it answers. A real swarm run is left to tests/swarm/ (phase 2)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from gate_support import TOKEN, GateServer, post_json, request

from scaler.gate.app import Settings
from scaler.gate.engine import Engine
from scaler.gate.rules import MANAGED_LABEL, STACK_LABEL, Scope

STACK = "gt"
SPEC: dict[str, Any] = {
    "Name": "gt_worker-io",
    "Labels": {MANAGED_LABEL: "true", STACK_LABEL: STACK},
    "TaskTemplate": {
        "ContainerSpec": {
            "Image": "app:1",
            "Env": ["CELERY_BROKER_URL=redis://scaler:hunter2@redis/0", "WORKER_WARM_START=0"],
            "DNSConfig": None,
        },
        "ForceUpdate": 0,
    },
    "Mode": {"Replicated": {"Replicas": 2}},
    "Ünicode": "kept as the engine sent it",
}


def _service(sid: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["Name"], spec["Labels"] = name, labels
    return {"ID": sid, "Version": {"Index": 41}, "Spec": spec}


MANAGED = _service("svc1", "gt_worker-io", {MANAGED_LABEL: "true", STACK_LABEL: STACK})
UNMANAGED = _service("svc2", "gt_redis", {STACK_LABEL: STACK})
OTHER = _service("svc3", "other_worker-io", {MANAGED_LABEL: "true", STACK_LABEL: "other"})


class RecordedEngine(Engine):
    """Answers from a table; records every request the gate composed."""

    def __init__(self) -> None:
        super().__init__("unix:///nonexistent")
        self.calls: list[tuple[str, str, dict[str, Any], Any]] = []
        self.update_answer: tuple[int, bytes] = (200, b'{"Warnings":null}')

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
        services = {s["ID"]: s for s in (MANAGED, UNMANAGED, OTHER)}
        services.update({s["Spec"]["Name"]: s for s in (MANAGED, UNMANAGED, OTHER)})
        if (method, path) == ("GET", "/services"):
            # Every service, as if the engine ignored the label filter: the gate checks again.
            return 200, json.dumps([MANAGED, UNMANAGED, OTHER]).encode()
        if method == "GET" and path.startswith("/services/"):
            found = services.get(path.split("/")[2])
            if found is None:
                return 404, b'{"message":"service x not found"}'
            return 200, json.dumps(found).encode()
        if method == "POST" and path.endswith("/update"):
            return self.update_answer
        if (method, path) == ("GET", "/tasks"):
            rows = [
                {"ID": "t1", "ServiceID": "svc1", "Spec": copy.deepcopy(SPEC["TaskTemplate"])},
                {"ID": "t2", "ServiceID": "svc2", "Spec": copy.deepcopy(SPEC["TaskTemplate"])},
            ]
            return 200, json.dumps(rows).encode()
        if (method, path) == ("GET", "/nodes"):
            node = {
                "ID": "n1",
                "Description": {"Hostname": "m1", "Engine": {"Plugins": []}},
                "Status": {"State": "ready", "Addr": "10.0.0.1"},
                "Spec": {"Availability": "active", "Labels": {"secret": "x"}},
                "ManagerStatus": {"Leader": True, "Reachability": "reachable"},
                "Version": {"Index": 9},
            }
            return 200, json.dumps([node]).encode()
        return 500, b'{"message":"unexpected"}'


@pytest.fixture
def engine() -> RecordedEngine:
    return RecordedEngine()


@pytest.fixture
def gate(engine: RecordedEngine) -> Iterator[GateServer]:
    settings = Settings(scope=Scope(STACK_LABEL, STACK), token=TOKEN)
    with GateServer(settings, engine) as server:
        yield server


def test_scale_changes_only_the_replica_count_of_the_spec_as_stored(
    gate: GateServer, engine: RecordedEngine
) -> None:
    answer = post_json(
        gate.port, "/gate/v1/services/gt_worker-io/scale", {"replicas": 5, "version": 41}
    )
    assert answer.status == 200, answer.body
    method, path, params, body = engine.calls[-1]
    assert (method, path, params) == ("POST", "/services/svc1/update", {"version": 41})
    expected = copy.deepcopy(MANAGED["Spec"])
    expected["Mode"]["Replicated"]["Replicas"] = 5
    assert body == expected  # nothing filled in, nothing left out (DNSConfig stays null)
    # The read was of the spec as stored (no insertDefaults).
    assert ("GET", "/services/gt_worker-io", {}, None) in engine.calls


def test_a_stale_version_is_a_conflict_and_nothing_is_posted(
    gate: GateServer, engine: RecordedEngine
) -> None:
    answer = post_json(gate.port, "/gate/v1/services/svc1/scale", {"replicas": 5, "version": 40})
    assert answer.status == 409 and "version 41, not 40" in answer.message
    assert not [c for c in engine.calls if c[0] == "POST"]
    engine.update_answer = (500, b'{"message":"rpc error: update out of sequence"}')
    answer = post_json(gate.port, "/gate/v1/services/svc1/scale", {"replicas": 5, "version": 41})
    assert answer.status == 409 and "out of sequence" in answer.message


@pytest.mark.parametrize("ref", ["gt_redis", "svc2", "other_worker-io", "svc3", "nothing"])
def test_only_a_managed_service_of_the_stack_is_scaled(
    gate: GateServer, engine: RecordedEngine, ref: str
) -> None:
    answer = post_json(gate.port, f"/gate/v1/services/{ref}/scale", {"replicas": 0, "version": 41})
    assert answer.status == 404 and f"no managed service {ref!r}" in answer.message
    assert not [c for c in engine.calls if c[0] == "POST"]


def test_services_tasks_and_nodes_are_narrowed_and_reduced(
    gate: GateServer, engine: RecordedEngine
) -> None:
    services = request(gate.port, "GET", "/services?status=1").json()
    assert [s["ID"] for s in services] == ["svc1"]
    assert services[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == [
        "CELERY_BROKER_URL",
        "WORKER_WARM_START=0",
    ]
    filters = json.loads(engine.calls[-1][2]["filters"])
    assert set(filters["label"]) == {f"{MANAGED_LABEL}=true", f"{STACK_LABEL}={STACK}"}

    tasks = request(gate.port, "GET", "/tasks").json()
    assert [t["ID"] for t in tasks] == ["t1"]
    assert "hunter2" not in json.dumps(tasks)
    assert json.loads(engine.calls[-1][2]["filters"]) == {"service": ["svc1"]}
    asked = json.dumps({"service": ["gt_worker-io"], "desired-state": ["running"]})
    assert request(gate.port, "GET", f"/tasks?filters={quote(asked)}").status == 200
    assert json.loads(engine.calls[-1][2]["filters"]) == {
        "service": ["svc1"],
        "desired-state": ["running"],
    }
    calls = len(engine.calls)
    for other in ("gt_redis", "svc3", "other_worker-io"):
        answer = request(
            gate.port, "GET", f"/tasks?filters={quote(json.dumps({'service': [other]}))}"
        )
        assert answer.json() == []
    assert not [c for c in engine.calls[calls:] if c[1] == "/tasks"]

    nodes = request(gate.port, "GET", "/nodes").json()
    assert nodes == [
        {
            "ID": "n1",
            "Description": {"Hostname": "m1"},
            "Status": {"State": "ready"},
            "Spec": {"Availability": "active"},
            "ManagerStatus": {"Leader": True, "Reachability": "reachable"},
        }
    ]


def test_container_routes_of_a_swarm_gate_are_bounded_by_the_stack_label() -> None:
    scope = Scope(STACK_LABEL, STACK)
    assert scope.holds({MANAGED_LABEL: "true", STACK_LABEL: STACK})
    assert not scope.holds({MANAGED_LABEL: "true", STACK_LABEL: "other"})
    assert not scope.holds({MANAGED_LABEL: "True", STACK_LABEL: STACK})
    assert not scope.holds({STACK_LABEL: STACK})
