"""The gate's OpenAPI description (scaler/gate/openapi.py) is its route table: every route, nothing
else, each route's query parameters and body model; ``GET /gate/v1/openapi.json`` serves the
operations of the gate's own mode, with the token like everything else. No engine is asked."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import schemathesis
from gate_support import TOKEN, GateServer, exchange, request

from scaler.gate import app, openapi
from scaler.gate.app import ROUTES, Settings
from scaler.gate.clone import ReplicaRequest
from scaler.gate.rules import PROJECT_LABEL, STACK_LABEL, Scope

METHODS = {"get", "head", "post", "put", "delete", "patch", "options", "trace"}


def _operations(schema: dict[str, object]) -> dict[tuple[str, str], dict[str, object]]:
    paths = schema["paths"]
    assert isinstance(paths, dict)
    return {
        (method.upper(), path): operation
        for path, item in paths.items()
        for method, operation in item.items()
        if method in METHODS
    }


def _routes(kind: str | None = None) -> set[tuple[str, str]]:
    return {
        (r.method, r.name.split(" ", 1)[1])
        for r in ROUTES
        if kind is None or r.mode in ("any", kind)
    }


@pytest.mark.parametrize("kind", [None, "project", "stack"])
def test_the_schema_has_every_route_of_the_table_and_nothing_else(kind: str | None) -> None:
    operations = _operations(openapi.schema(kind))
    assert set(operations) == _routes(kind)
    assert len(operations) == len(_routes(kind)) >= (19 if kind is None else 14)
    for route in ROUTES:
        key = (route.method, route.name.split(" ", 1)[1])
        if key not in operations:
            continue
        operation = operations[key]
        parameters = operation["parameters"]
        assert isinstance(parameters, list)
        query = {p["name"] for p in parameters if p["in"] == "query"}
        assert query == set(route.params), route.name
        path = {p["name"] for p in parameters if p["in"] == "path"}
        assert path == set(route.pattern.groupindex), route.name
        assert ("requestBody" in operation) == route.body, route.name
        assert {"401", "403"} <= set(operation["responses"]), route.name  # type: ignore[arg-type]


def test_the_bodies_are_the_models_the_routes_validate_with() -> None:
    operations = _operations(openapi.schema())
    bodies = {
        key: op["requestBody"]["content"]["application/json"]["schema"]  # type: ignore[index]
        for key, op in operations.items()
        if "requestBody" in op
    }
    assert bodies == {
        ("POST", "/gate/v1/replicas"): ReplicaRequest.model_json_schema(),
        ("POST", "/gate/v1/services/{ref}/scale"): app.ScaleRequest.model_json_schema(),
    }
    replicas = bodies[("POST", "/gate/v1/replicas")]
    assert replicas["additionalProperties"] is False and replicas["required"] == [
        "service",
        "number",
    ]


def test_a_route_without_a_description_or_with_other_parameters_fails_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def handler(gate: app.Gate, call: app.Call) -> app.Response:
        raise AssertionError("not called")

    new = app.Route("GET", re.compile("/new"), handler, name="GET /new")
    changed = [dataclasses.replace(r, params=r.params | {"x"}) for r in ROUTES]
    for routes, words in [
        ((*ROUTES, new), "'GET /new' of app.ROUTES has no description"),
        (tuple(changed), "are not the route's"),
        (ROUTES[1:], "which app.ROUTES does not have"),
    ]:
        monkeypatch.setattr(app, "ROUTES", routes)
        openapi._schema.cache_clear()
        with pytest.raises(ValueError, match=words):
            openapi.schema()
    monkeypatch.undo()
    openapi._schema.cache_clear()
    assert _operations(openapi.schema()).keys() == _routes()


def test_the_schema_is_valid_openapi_that_schemathesis_loads() -> None:
    loaded = schemathesis.openapi.from_dict(openapi.schema())
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} == _routes()


@pytest.fixture(scope="module", params=[PROJECT_LABEL, STACK_LABEL])
def idle_gate(request: pytest.FixtureRequest) -> Iterator[GateServer]:
    """A gate whose engine is nowhere: only its own answers can be 2xx."""
    settings = Settings(
        scope=Scope(request.param, "openapi-test"),
        token=TOKEN,
        docker_host="unix:///nonexistent/docker.sock",
    )
    with GateServer(settings) as server:
        yield server


def test_the_gate_serves_its_modes_schema_with_the_token_only(idle_gate: GateServer) -> None:
    kind = idle_gate.gate.scope.kind
    served = request(idle_gate.port, "GET", "/gate/v1/openapi.json")
    assert served.status == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == openapi.schema(kind)
    assert set(_operations(served.json())) == _routes(kind)
    assert request(idle_gate.port, "GET", "/gate/v1/openapi.json", token=None).status == 401
    assert request(idle_gate.port, "GET", "/gate/v1/openapi.json", token="x" * 32).status == 401
    prefixed = request(idle_gate.port, "GET", "/v1.41/gate/v1/openapi.json")
    assert prefixed.status == 403
    with_query = request(idle_gate.port, "GET", "/gate/v1/openapi.json?x=1")
    assert with_query.status == 400
    status = request(idle_gate.port, "GET", "/gate/v1/status").json()
    assert status["served"]["GET /gate/v1/openapi.json"] >= 1


def test_a_body_nested_too_deeply_is_400_not_500(idle_gate: GateServer) -> None:
    target = (
        "/gate/v1/replicas"
        if idle_gate.gate.scope.kind == "project"
        else "/gate/v1/services/web/scale"
    )
    answer = request(idle_gate.port, "POST", target, b"[" * 2000 + b"]" * 2000)
    assert answer.status == 400 and "nested too deeply" in answer.message, answer.body
    deep = quote('{"label":' + "[" * 1500 + "]" * 1500 + "}")
    raw = (
        f"GET /containers/json?filters={deep} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    )
    answer = exchange(idle_gate.port, raw.encode())
    assert answer.status == 400 and "nested too deeply" in answer.message, answer.body


def test_a_signal_is_one_of_the_described_names_in_ascii(idle_gate: GateServer) -> None:
    """Refused before the container is looked up (this gate has no engine)."""
    for signal in ("%C5%BFIGKILL", "S%C4%B1GTERM", "HUP", "SIGKILL%00"):
        answer = request(idle_gate.port, "POST", f"/containers/x/kill?signal={signal}")
        assert answer.status == 403 and "is not one the gate sends" in answer.message, signal
    answer = request(idle_gate.port, "POST", "/containers/x/kill?signal=sigterm")
    assert answer.status == 502, answer.body  # accepted, then the (absent) engine is asked
