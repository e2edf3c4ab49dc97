"""What the gate refuses, with raw HTTP: anything not managed, anything not an operation, any
trick of path, version, query or token; and each time the engine shows nothing changed."""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import quote

import pytest
from gate_support import TOKEN, GateServer, exchange, post_json, request
from gate_world import World

from scaler.gate.rules import PROJECT_LABEL

pytestmark = pytest.mark.docker

NOT_AN_OPERATION = "is not an operation of the gate"


def _state(world: World) -> dict[str, tuple[str, bool]]:
    """Every container of the world: its id and whether it runs (the engine's view)."""
    rows = world.client.api.containers(all=True, filters={"label": f"gate-test={world.uid}"})
    return {str(r["Names"][0]).lstrip("/"): (r["Id"], r["State"] == "running") for r in rows}


OPERATIONS = [
    ("GET", "/containers/{ref}/json"),
    ("GET", "/containers/{ref}/stats?stream=false"),
    ("GET", "/containers/{ref}/stats?stream=true"),
    ("POST", "/containers/{ref}/stop?t=0"),
    ("POST", "/containers/{ref}/kill?signal=SIGKILL"),
    ("POST", "/containers/{ref}/kill?signal=SIGTERM"),
    ("POST", "/containers/{ref}/start"),
    ("POST", "/containers/{ref}/wait?condition=not-running"),
    ("DELETE", "/containers/{ref}?force=1"),
    ("DELETE", "/containers/{ref}"),
]


@pytest.mark.parametrize("target", ["lookalike", "other", "oneoff", "absent"])
@pytest.mark.parametrize("by", ["name", "id", "short id"])
def test_no_operation_reaches_an_unmanaged_container(
    world: World, gate: GateServer, target: str, by: str
) -> None:
    before = _state(world)
    name = getattr(world, target) if target != "absent" else "gt-nobody-worker-x-1"
    if by == "name":
        ref = name
    elif target == "absent":
        ref = "0123456789ab" + ("cd" * 26 if by == "id" else "")
    else:
        ref = before[name][0] if by == "id" else before[name][0][:12]
    for method, path in OPERATIONS:
        answer = request(gate.port, method, path.replace("{ref}", ref), timeout_s=10)
        assert answer.status == 404, (method, path, answer.body)
        assert f"no managed container {ref!r}" in answer.message
        assert answer.message.startswith(f"gate: {method} /containers/{ref}")
    assert _state(world) == before


def test_a_refusal_is_logged_as_json_and_counted(
    world: World, gate: GateServer, caplog: pytest.LogCaptureFixture
) -> None:
    counted = request(gate.port, "GET", "/gate/v1/status").json()["refused"]
    with caplog.at_level(logging.WARNING, logger="scaler.gate"):
        assert request(gate.port, "POST", f"/containers/{world.lookalike}/stop").status == 404
        assert request(gate.port, "POST", "/containers/create", b"{}").status == 403
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "scaler.gate"]
    kinds = {(r["kind"], r["method"], r["path"]) for r in records}
    assert ("not-managed", "POST", f"/containers/{world.lookalike}/stop") in kinds
    assert ("not-an-operation", "POST", "/containers/create") in kinds
    now = request(gate.port, "GET", "/gate/v1/status").json()
    assert now["refused"]["not-managed"] == counted.get("not-managed", 0) + 1
    assert now["refused"]["not-an-operation"] == counted.get("not-an-operation", 0) + 1
    assert now["refused_total"] == sum(now["refused"].values())


UNKNOWN = [
    ("POST", "/containers/create"),
    ("POST", "/containers/create?name=x"),
    ("POST", "/v1.41/containers/create"),
    ("POST", "/v1.47/containers/create"),
    ("POST", "/containers/{t}/exec"),
    ("POST", "/exec/0123456789ab/start"),
    ("POST", "/build"),
    ("POST", "/networks/{net}/connect"),
    ("POST", "/networks/{net}/disconnect"),
    ("POST", "/images/create?fromImage=alpine"),
    ("GET", "/images/json"),
    ("GET", "/images/local/python:3.11/json"),
    ("DELETE", "/images/local/python:3.11"),
    ("PUT", "/containers/{t}/archive?path=/"),
    ("GET", "/containers/{t}/archive?path=/"),
    ("POST", "/containers/{t}/update"),
    ("POST", "/containers/{t}/rename?name=x"),
    ("POST", "/containers/{t}/attach"),
    ("GET", "/containers/{t}/logs?stdout=1"),
    ("GET", "/containers/{t}/top"),
    ("GET", "/containers/{t}/changes"),
    ("GET", "/containers/{t}/export"),
    ("POST", "/containers/{t}/restart"),
    ("POST", "/containers/{t}/pause"),
    ("POST", "/containers/{t}/resize"),
    ("POST", "/containers/prune"),
    ("POST", "/commit?container={t}"),
    ("GET", "/volumes"),
    ("POST", "/volumes/create"),
    ("GET", "/secrets"),
    ("GET", "/configs"),
    ("POST", "/swarm/init"),
    ("GET", "/services"),
    ("GET", "/tasks"),
    ("GET", "/nodes"),
    ("POST", "/services/create"),
    ("POST", "/gate/v1/services/x/scale"),
    ("POST", "/session"),
    ("GET", "/system/df"),
    ("GET", "/plugins"),
    ("GET", "/distribution/alpine/json"),
    ("GET", "/gate/v1/replicas"),
    ("PUT", "/gate/v1/replicas"),
    ("POST", "/v1.41/gate/v1/replicas"),
    ("GET", "/"),
    ("GET", "/containers/{t}/json/"),
    ("GET", "/CONTAINERS/json"),
    ("GET", "/Containers/{t}/json"),
    ("PATCH", "/containers/{t}/json"),
    ("OPTIONS", "/_ping"),
    ("POST", "/_ping"),
    ("POST", "/containers/json"),
    ("PUT", "/containers/{t}/start"),
    ("GET", "/containers/{t}/start"),
    ("DELETE", "/containers/{t}/json"),
    # Path tricks: encodings, empty and dot segments, absolute form.
    ("GET", "//containers/json"),
    ("GET", "/containers//json"),
    ("GET", "/containers/../containers/json"),
    ("POST", "/containers/{t}/../../containers/create"),
    ("POST", "/gate/v1/../../containers/create"),
    ("GET", "/containers/./json"),
    ("GET", "/containers/{t}/json/."),
    ("GET", "/containers/%2e%2e/json"),
    ("GET", "/%63ontainers/json"),
    ("GET", "/containers/{t}%2fjson"),
    ("GET", "/containers/json%00"),
    ("POST", "/containers/{t}%2Fstop"),
    ("GET", "/v1.41/../containers/json"),
    ("GET", "/v1.41//containers/json"),
    ("GET", "http://gate/containers/json"),
    ("GET", "/containers/{t}/json;x=1"),
    ("GET", "/containers/{t}/json\\"),
]


@pytest.mark.parametrize(("method", "path"), UNKNOWN)
def test_what_is_not_an_operation_is_refused_naming_it(
    world: World, gate: GateServer, method: str, path: str
) -> None:
    before = _state(world)
    target = path.replace("{t}", world.template).replace("{net}", world.networks[1])
    body = b"{}" if method in ("POST", "PUT") else None
    answer = request(gate.port, method, target, body)
    assert answer.status == 403, (answer.status, answer.body)
    shown = target.split("?", 1)[0]
    assert answer.json() == {"message": f"gate: {method} {shown} {NOT_AN_OPERATION}"}
    assert _state(world) == before


@pytest.mark.parametrize("version", ["1.12", "1.23", "1.24", "1.40", "0.99"])
def test_an_api_version_older_than_the_gates_is_refused_naming_it(
    world: World, gate: GateServer, version: str
) -> None:
    before = _state(world)
    for method, path in [
        ("POST", f"/containers/{world.template}/start"),
        ("GET", "/containers/json"),
        ("POST", "/containers/create"),
    ]:
        answer = request(gate.port, method, f"/v{version}{path}", b"" if method == "POST" else None)
        assert answer.status == 400, answer.body
        assert f"API version {version} is older than 1.41" in answer.message
    assert _state(world) == before


@pytest.mark.parametrize("version", ["1.41", "1.44", "1.45", "1.51"])
def test_the_gates_version_and_newer_prefixes_are_read(
    world: World, gate: GateServer, version: str
) -> None:
    answer = request(gate.port, "GET", f"/v{version}/containers/{world.template}/json")
    assert answer.status == 200 and answer.json()["Name"] == f"/{world.template}"


def test_every_request_needs_the_token(world: World, gate: GateServer) -> None:
    before = _state(world)
    cases: list[dict[str, str] | None] = [
        None,
        {"Authorization": "Bearer wrong-token-0123456789abcdef00"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"bearer {TOKEN}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer  {TOKEN}"},
        {"X-Registry-Auth": TOKEN},
    ]
    for headers in cases:
        for method, path in [
            ("GET", "/_ping"),
            ("GET", "/containers/json"),
            ("POST", f"/containers/{world.template}/stop?t=0"),
            ("POST", "/gate/v1/replicas"),
            ("POST", "/containers/create"),
            ("GET", "/gate/v1/status"),
        ]:
            body = b'{"service":"worker-x","number":40}' if method == "POST" else None
            answer = request(gate.port, method, path, body, headers=headers, token=None)
            assert answer.status == 401, (headers, path, answer.body)
            assert answer.message == "gate: a valid bearer token is required"
    # Two Authorization headers, even one of them right, are refused.
    head = (
        f"GET /containers/json HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Authorization: Bearer nope\r\nConnection: close\r\n\r\n"
    )
    assert exchange(gate.port, head.encode()).status == 401
    assert _state(world) == before
    assert request(gate.port, "GET", "/_ping").body == b"OK"


def test_the_caller_can_only_narrow_the_listing(world: World, gate: GateServer) -> None:
    def names(query: str = "") -> set[str]:
        answer = request(gate.port, "GET", f"/containers/json?all=1{query}")
        assert answer.status == 200, answer.body
        return {r["Names"][0].lstrip("/") for r in answer.json()}

    listed = names()
    assert world.template in listed
    assert not {world.lookalike, world.other, world.oneoff} & listed
    for filters in [
        {"label": [f"{PROJECT_LABEL}={world.other_project}"]},
        {"label": ["autoscale.managed=false"]},
        {"name": [world.lookalike]},
        {"id": [_state(world)[world.other][0]]},
        {"label": {f"{PROJECT_LABEL}={world.other_project}": True}},
    ]:
        assert names(f"&filters={quote(json.dumps(filters))}") == set(), filters
    assert names(f"&filters={quote(json.dumps({'name': [world.template]}))}") == {world.template}
    running = request(gate.port, "GET", "/containers/json").json()
    assert {r["Names"][0].lstrip("/") for r in running} <= listed


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("?all=1&all=0", "given twice"),
        ("?since=x", "'since' is not read"),
        ("?before=" + "a" * 12, "'before' is not read"),
        ("?filters=" + quote('{"label":["a"],"label":["b"]}'), "duplicate"),
        ("?filters=" + quote('{"lab\u017fl":["a"]}'), "non-ASCII"),
        ("?filters=" + quote('{"label":"a"}'), "list of strings"),
        ("?filters=" + quote('["label"]'), "JSON object"),
        ("?filters=" + quote("{"), "not JSON"),
        ("?limit=x", "integer"),
        ("?filters=" + quote('{"since":["x"]}'), "'since' is not read"),
        ("?filters=" + quote('{"before":["x"]}'), "'before' is not read"),
        ("?filters=" + quote('{"ancestor":["local/python:3.11"]}'), "'ancestor' is not read"),
        ("?filters=" + quote('{"volume":["x"]}'), "'volume' is not read"),
    ],
)
def test_a_listing_query_the_gate_does_not_read_is_refused(
    gate: GateServer, query: str, words: str
) -> None:
    answer = request(gate.port, "GET", f"/containers/json{query}")
    assert answer.status == 400, answer.body
    assert words in answer.message


def test_lifecycle_queries_and_bodies_are_bounded(
    world: World, gate: GateServer, managed: object
) -> None:
    make = managed
    assert callable(make)
    name = make(start=False)
    base = f"/containers/{name}"
    # start with a body: refused, not started
    answer = request(gate.port, "POST", f"{base}/start", b'{"Binds":["/:/host"]}')
    assert answer.status == 400 and "takes no body" in answer.message
    assert not world.running(name)
    assert request(gate.port, "POST", f"{base}/start?detachKeys=x").status == 400
    assert request(gate.port, "POST", f"{base}/start").status == 204
    assert world.running(name)
    assert request(gate.port, "POST", f"{base}/start").status == 304
    # kill: only KILL and TERM
    for signal in ("HUP", "SIGUSR1", "9", "SIGSTOP", "kill%00"):
        answer = request(gate.port, "POST", f"{base}/kill?signal={signal}")
        assert answer.status in (400, 403), (signal, answer.body)
        assert world.running(name)
    assert request(gate.port, "POST", f"{base}/stop?t=1&t=2").status == 400
    assert request(gate.port, "POST", f"{base}/stop?t=-1").status == 400
    assert request(gate.port, "POST", f"{base}/stop?signal=SIGKILL").status == 400
    assert request(gate.port, "POST", f"{base}/wait?condition=bogus").status == 400
    assert world.running(name)
    # remove: never the volumes, never links; not while running without force
    for query in ("?v=1", "?v=true", "?force=1&v=True", "?link=1"):
        answer = request(gate.port, "DELETE", f"{base}{query}")
        assert answer.status == 403, (query, answer.body)
        assert world.exists(name)
    assert request(gate.port, "DELETE", base).status == 409
    assert request(gate.port, "POST", f"{base}/kill?signal=TERM").status == 204
    waited = request(gate.port, "POST", f"{base}/wait?condition=not-running")
    assert waited.status == 200 and "StatusCode" in waited.json()
    assert request(gate.port, "DELETE", f"{base}?v=0&force=0").status == 204
    assert not world.exists(name)


def test_a_stop_waits_no_longer_than_the_containers_own_grace_period(
    world: World, gate: GateServer, managed: object
) -> None:
    assert callable(managed)
    # sleep as PID 1 ignores SIGTERM: only the engine's SIGKILL after the grace period stops it.
    name = managed(init=False, stop_timeout=2)
    began = time.monotonic()
    answer = request(gate.port, "POST", f"/containers/{name}/stop?t=300", timeout_s=60)
    took = time.monotonic() - began
    assert answer.status == 204, answer.body
    assert not world.running(name)
    assert 1.5 <= took < 20, took
    assert world.inspect(name)["State"]["ExitCode"] == 137


def test_swarm_reads_on_an_engine_that_is_no_swarm_pass_its_error(
    world: World, swarm_gate: GateServer
) -> None:
    for path in ("/services", "/tasks", "/nodes", "/v1.41/services?status=1"):
        answer = request(swarm_gate.port, "GET", path)
        assert answer.status == 503, (path, answer.body)
        assert "swarm" in answer.message.lower()
    answer = post_json(
        swarm_gate.port, "/gate/v1/services/gt_worker/scale", {"replicas": 2, "version": 10}
    )
    assert answer.status == 503 and "swarm" in answer.message.lower()
    info = request(swarm_gate.port, "GET", "/info").json()
    assert info == {
        "Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False, "NodeID": ""}
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"replicas":2,"version":10,"replicas":200}',
        b'{"replicas":2,"version":10,"Spec":{}}',
        b'{"replicas":"2","version":10}',
        b'{"replicas":-1,"version":10}',
        b'{"replicas":2}',
        '{"replicas":2,"version":10,"\u017fpec":{}}'.encode(),
    ],
)
def test_a_hostile_scale_body_is_refused_before_the_engine_is_asked(
    swarm_gate: GateServer, body: bytes
) -> None:
    answer = request(swarm_gate.port, "POST", "/gate/v1/services/gt_worker/scale", body)
    assert answer.status == 400, answer.body


def test_the_ping_version_and_info_say_only_what_the_scaler_reads(gate: GateServer) -> None:
    version = request(gate.port, "GET", "/version").json()
    assert set(version) <= {"Version", "ApiVersion", "MinAPIVersion", "GoVersion", "Os", "Arch"}
    assert version["ApiVersion"] == version["MinAPIVersion"] == "1.41"
    assert set(request(gate.port, "GET", "/info").json()["Swarm"]) <= {
        "LocalNodeState",
        "ControlAvailable",
        "NodeID",
    }
    ping = request(gate.port, "HEAD", "/_ping")
    assert ping.status == 200 and ping.headers["api-version"] == "1.41"


def test_no_operation_of_the_engine_takes_a_body(world: World, gate: GateServer) -> None:
    before = _state(world)
    for method, path in [
        ("GET", "/containers/json"),
        ("GET", f"/containers/{world.template}/json"),
        ("POST", f"/containers/{world.template}/stop?t=0"),
        ("POST", f"/containers/{world.template}/kill"),
        ("DELETE", f"/containers/{world.template}?force=1"),
    ]:
        answer = request(gate.port, method, path, b'{"HostConfig":{"Privileged":true}}')
        assert answer.status == 400 and "takes no body" in answer.message, (path, answer.body)
    assert _state(world) == before
