"""POST /gate/v1/replicas: a clone composed by the gate from the engine's state, nothing else.

The clone equals its template field by field but for its name, number label and hostname; an
unsafe template is refused naming the setting; a hostile body (duplicate keys, a Unicode
look-alike key, extra fields, wrong types, oversized, chunked) is refused before anything is
asked of the engine, and the engine shows no new container.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from docker.types import DriverConfig, Mount
from gate_support import SECRET, GateServer, exchange, post_json, request
from gate_world import World

from scaler.backends.warm_pool import WARM_ENV
from scaler.gate.rules import NUMBER_LABEL
from scaler.gate.rules import WARM_ENV as GATE_WARM_ENV

pytestmark = pytest.mark.docker

REPLICAS = "/gate/v1/replicas"


def test_the_gates_warm_flag_is_the_warm_pools() -> None:
    assert GATE_WARM_ENV == WARM_ENV


def test_a_clone_is_its_template_but_for_name_number_and_hostname(
    world: World, gate: GateServer
) -> None:
    answer = post_json(gate.port, REPLICAS, {"service": "worker-x", "number": 2, "warm": False})
    assert answer.status == 201, answer.body
    name = f"{world.project}-worker-x-2"
    assert answer.json()["Name"] == name
    clone = world.inspect(name)
    assert answer.json()["Id"] == clone["Id"]
    template = world.inspect(world.template)
    assert not clone["State"]["Running"] and clone["State"]["Status"] == "created"

    for key, value in template["HostConfig"].items():
        assert clone["HostConfig"][key] == value, f"HostConfig.{key}"
    assert set(clone["HostConfig"]) == set(template["HostConfig"])
    for key, value in template["Config"].items():
        if key in ("Hostname", "Labels"):
            continue
        assert clone["Config"][key] == value, f"Config.{key}"
    assert clone["Config"]["Hostname"] == clone["Id"][:12] != template["Config"]["Hostname"]
    labels = dict(template["Config"]["Labels"], **{NUMBER_LABEL: "2"})
    assert clone["Config"]["Labels"] == labels
    assert clone["Config"]["Image"] == "local/python:3.11" and clone["Image"] == template["Image"]
    assert f"SECRET_TOKEN={SECRET}" in clone["Config"]["Env"]  # the engine's own, copied
    assert not any(e.startswith(f"{WARM_ENV}=") for e in clone["Config"]["Env"])
    assert [m["Name"] for m in clone["Mounts"]] == [m["Name"] for m in template["Mounts"]]
    networks = clone["NetworkSettings"]["Networks"]
    assert set(networks) == set(template["NetworkSettings"]["Networks"]) == set(world.networks)
    for net in world.networks:
        assert {name, "worker-x"} <= set(networks[net]["Aliases"] or []), net

    # It starts and runs as its template does.
    world.client.api.start(clone["Id"])
    assert world.running(name)


def test_a_warm_clone_carries_the_warm_flag_which_inspect_shows(
    world: World, gate: GateServer
) -> None:
    answer = post_json(gate.port, REPLICAS, {"service": "worker-x", "number": 3, "warm": True})
    assert answer.status == 201, answer.body
    env = world.inspect(answer.json()["Id"])["Config"]["Env"]
    assert f"{WARM_ENV}=1" in env and env.count(f"{WARM_ENV}=1") == 1
    shown = request(gate.port, "GET", f"/containers/{answer.json()['Name']}/json").json()
    assert shown["Config"]["Env"] == ["SECRET_TOKEN", "PLAIN_SETTING", *_path(env), f"{WARM_ENV}=1"]


def _path(env: list[str]) -> list[str]:
    """The image's own variables (PATH, LANG...), names only."""
    return [e.split("=", 1)[0] for e in env if not e.startswith(("SECRET_", "PLAIN_", WARM_ENV))]


def test_a_taken_name_is_a_conflict(world: World, gate: GateServer) -> None:
    before = world.names()
    answer = post_json(gate.port, REPLICAS, {"service": "worker-x", "number": 1})
    assert answer.status == 409, answer.body
    assert f"{world.project}-worker-x-1" in answer.message
    assert world.names() == before


def test_a_clone_replaces_the_stopped_container_of_its_number(
    world: World, gate: GateServer
) -> None:
    """``replaces``: the service's only container, stopped, is the template and goes once the
    clone is composed, which takes its name and number. Only a managed, stopped container of the
    same service and number is removed; anything else is refused and nothing changes."""
    name = f"{world.project}-worker-r-4"
    old = world.create(name, world.labels("worker-r", 4))
    elsewhere = world.labels("worker-r", 4, project=world.other_project)
    other = world.create(f"{world.other_project}-worker-r-4", elsewhere, start=False)
    unmanaged = world.labels("worker-r", 4, managed=False)
    lookalike = world.create(f"{world.project}-worker-r-77", unmanaged, start=False)
    refused = {
        "running": (old, 4, 409, "is running"),
        "another number": (old, 5, 409, "not 5"),
        "another project": (other, 4, 404, "no managed container"),
        "unmanaged": (lookalike, 4, 404, "no managed container"),
        "absent": ("0" * 64, 4, 404, "no managed container"),
    }
    for why, (ref, number, status, words) in refused.items():
        wanted = {"service": "worker-r", "number": number, "replaces": ref}
        answer = post_json(gate.port, REPLICAS, wanted)
        assert answer.status == status and words in answer.message, (why, answer.body)
        assert world.exists(old) and world.exists(other) and world.exists(lookalike), why
    not_an_id = post_json(gate.port, REPLICAS, {"service": "worker-r", "number": 4,
                                                "replaces": name})  # fmt: skip
    assert not_an_id.status == 400, not_an_id.body

    world.client.api.stop(old, timeout=0)
    answer = post_json(gate.port, REPLICAS, {"service": "worker-r", "number": 4, "replaces": old})
    assert answer.status == 201, answer.body
    assert answer.json()["Name"] == name and answer.json()["Id"] != old
    assert not world.exists(old) and world.exists(other) and world.exists(lookalike)
    clone = world.inspect(name)
    world.made.append(clone["Id"])
    assert clone["Config"]["Labels"][NUMBER_LABEL] == "4"
    assert clone["Config"]["Cmd"] == ["sleep", "infinity"]


def test_a_service_without_a_managed_container_has_no_template(
    world: World, gate: GateServer
) -> None:
    before = world.names()
    # worker-x of another project, and the look-alike's and the one-off's, do not count.
    world.create(f"{world.project}-worker-n-1", world.labels("worker-n", 1, managed=False))
    answer = post_json(gate.port, REPLICAS, {"service": "worker-n", "number": 2})
    assert answer.status == 404 and "no container" in answer.message
    assert world.names() == before | {f"{world.project}-worker-n-1"}


UNSAFE = {
    "bind-of-root": ({"binds": {"/": {"bind": "/host", "mode": "ro"}}}, "bind mount of host path"),
    "privileged": ({"privileged": True}, "HostConfig.Privileged"),
    "cap-add": ({"cap_add": ["NET_ADMIN"]}, "HostConfig.CapAdd"),
    "host-network": ({"network_mode": "host"}, "HostConfig.NetworkMode"),
    "host-pid": ({"pid_mode": "host"}, "HostConfig.PidMode"),
    "device": ({"devices": ["/dev/null:/dev/xnull:rwm"]}, "HostConfig.Devices"),
    "unconfined": ({"security_opt": ["seccomp=unconfined"]}, "HostConfig.SecurityOpt"),
    "unmasked-paths": ({"raw_host": {"MaskedPaths": []}}, "HostConfig.MaskedPaths is empty"),
    "volume-of-a-host-path": (
        {"binds": {"{disguised}": {"bind": "/d", "mode": "rw"}}},
        "is of driver 'local' with options",
    ),
    "volume-driver-options": ({"mounts": ["{driver-opts}"]}, "volume driver options"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_an_unsafe_template_is_refused_naming_the_setting(
    world: World, gate: GateServer, kind: str
) -> None:
    host, setting = UNSAFE[kind]
    if kind == "volume-of-a-host-path":
        disguised = f"{world.project}_disguised"
        world.client.api.create_volume(
            disguised,
            driver_opts={"type": "none", "o": "bind", "device": "/tmp"},
            labels={"gate-test": world.uid},
        )
        host = {"binds": {disguised: {"bind": "/d", "mode": "rw"}}}
    if kind == "volume-driver-options":
        host = {
            "mounts": [
                Mount(
                    "/d",
                    f"{world.project}_opts",
                    driver_config=DriverConfig("local", {"type": "tmpfs", "device": "tmpfs"}),
                    labels={"gate-test": world.uid},
                )
            ]
        }
    service = f"worker-u{sorted(UNSAFE).index(kind)}"
    template = f"{world.project}-{service}-1"
    world.create(template, world.labels(service, 1), start=False, **host)
    before = world.names()
    answer = post_json(gate.port, REPLICAS, {"service": service, "number": 2})
    assert answer.status == 403, answer.body
    assert setting in answer.message and template in answer.message
    assert world.names() == before
    counters = request(gate.port, "GET", "/gate/v1/status").json()["refused"]
    assert counters["unsafe-template"] >= 1


def test_an_allowed_bind_mount_is_cloned(world: World) -> None:
    from gate_world import settings_for

    service = "worker-bind"
    world.create(
        f"{world.project}-{service}-1",
        world.labels(service, 1),
        start=False,
        binds={"/etc/hostname": {"bind": "/x", "mode": "ro"}},
    )
    with GateServer(settings_for(world)) as strict:
        answer = post_json(strict.port, REPLICAS, {"service": service, "number": 2})
        assert answer.status == 403 and "/etc/hostname" in answer.message
    with GateServer(settings_for(world, allowed_bind_mounts=("/etc",))) as lenient:
        answer = post_json(lenient.port, REPLICAS, {"service": service, "number": 2})
        assert answer.status == 201, answer.body
        binds = world.inspect(answer.json()["Id"])["HostConfig"]["Binds"]
        assert binds == ["/etc/hostname:/x:ro"]


HOSTILE: dict[str, tuple[bytes, int, str]] = {
    "duplicate key": (b'{"service":"worker-x","number":50,"number":51}', 400, "duplicate"),
    "duplicate nested under a look-alike": (
        b'{"service":"worker-x","number":50,"warm":false,"warm":true}',
        400,
        "duplicate",
    ),
    "raw UTF-8 long s folds to Binds": (
        '{"service":"worker-x","number":50,"Bind\u017f":["/:/host"]}'.encode(),
        400,
        "non-ASCII",
    ),
    "escaped long s": (
        b'{"service":"worker-x","number":50,"Bind\\u017f":["/:/host"]}',
        400,
        "non-ASCII",
    ),
    "look-alike of a field": ('{"\u017fervice":"worker-x","number":50}'.encode(), 400, "non-ASCII"),
    "kelvin sign": ('{"service":"worker-x","number":50,"\u212aey":1}'.encode(), 400, "non-ASCII"),
    "extra HostConfig": (
        b'{"service":"worker-x","number":50,"HostConfig":{"Privileged":true}}',
        400,
        "HostConfig",
    ),
    "extra image": (b'{"service":"worker-x","number":50,"image":"evil"}', 400, "image"),
    "number as string": (b'{"service":"worker-x","number":"50"}', 400, "number"),
    "number as float": (b'{"service":"worker-x","number":50.0}', 400, "number"),
    "number as bool": (b'{"service":"worker-x","number":true}', 400, "number"),
    "number zero": (b'{"service":"worker-x","number":0}', 400, "number"),
    "number too big": (b'{"service":"worker-x","number":1000}', 400, "number"),
    "number missing": (b'{"service":"worker-x"}', 400, "number"),
    "warm as string": (b'{"service":"worker-x","number":50,"warm":"yes"}', 400, "warm"),
    "warm as int": (b'{"service":"worker-x","number":50,"warm":1}', 400, "warm"),
    "service traversal": (b'{"service":"../x","number":50}', 400, "service"),
    "service upper case": (b'{"service":"Worker-x","number":50}', 400, "service"),
    "service with a label": (b'{"service":"worker-x,a=b","number":50}', 400, "service"),
    "service as number": (b'{"service":5,"number":50}', 400, "service"),
    "a list": (b'[{"service":"worker-x","number":50}]', 400, "body"),
    "not JSON": (b'{"service":"worker-x",', 400, "not JSON"),
    "NaN": (b'{"service":"worker-x","number":NaN}', 400, "NaN"),
    "not UTF-8": (b'{"service":"worker-x\xff","number":50}', 400, "UTF-8"),
    "UTF-16": ('{"service":"worker-x","number":50}'.encode("utf-16"), 400, "UTF-8"),
    "oversized": (
        json.dumps({"service": "worker-x", "number": 50, "pad": "x" * 5000}).encode(),
        413,
        "4096",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_body_is_refused_and_nothing_is_created(
    world: World, gate: GateServer, case: str
) -> None:
    body, status, words = HOSTILE[case]
    before = world.names()
    answer = request(gate.port, "POST", REPLICAS, body)
    assert answer.status == status, (answer.status, answer.body)
    assert words in answer.message, answer.message
    assert world.names() == before


def _raw(port: int, head: str, body: bytes = b"") -> Any:
    data = head.replace("\n", "\r\n").encode() + b"\r\n" + body
    return exchange(port, data)


def test_chunked_and_encoded_bodies_are_not_read(world: World, gate: GateServer) -> None:
    from gate_support import TOKEN

    before = world.names()
    payload = b'{"service":"worker-x","number":60}'
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    auth = f"Authorization: Bearer {TOKEN}"
    answer = _raw(
        gate.port,
        f"POST {REPLICAS} HTTP/1.1\nHost: g\n{auth}\nContent-Type: "
        "application/json\nTransfer-Encoding: chunked\nConnection: close\n",
        chunked,
    )
    assert answer.status == 400 and "chunked" in answer.message
    answer = _raw(
        gate.port,
        f"POST {REPLICAS} HTTP/1.1\nHost: g\n{auth}\nContent-Type: "
        f"application/json\nContent-Encoding: gzip\nContent-Length: {len(payload)}\n"
        "Connection: close\n",
        payload,
    )
    assert answer.status == 400 and "encoded" in answer.message
    # A Content-Length over the limit is refused before any byte of the body is read.
    answer = _raw(
        gate.port,
        f"POST {REPLICAS} HTTP/1.1\nHost: g\n{auth}\nContent-Type: "
        "application/json\nContent-Length: 100000000\nConnection: close\n",
    )
    assert answer.status == 413
    answer = request(gate.port, "POST", REPLICAS, payload, content_type="text/plain")
    assert answer.status == 415
    answer = request(gate.port, "POST", REPLICAS, payload, content_type=None)
    assert answer.status == 415
    assert world.names() == before


def test_replicas_is_no_operation_of_a_swarm_gate(world: World, swarm_gate: GateServer) -> None:
    before = world.names()
    answer = post_json(swarm_gate.port, REPLICAS, {"service": "worker-x", "number": 70})
    assert answer.status == 403 and "is not an operation of the gate" in answer.message
    assert world.names() == before


def test_the_clone_of_a_template_whose_image_tag_moved_uses_the_image_id(
    world: World, gate: GateServer
) -> None:
    tag = f"local/gate-test-{world.uid}:moving"
    image = world.client.images.get("local/python:3.11")
    image.tag(tag)
    try:
        service = "worker-tag"
        world.client.api.create_container(
            tag,
            command=["sleep", "infinity"],
            name=f"{world.project}-{service}-1",
            labels=world.labels(service, 1),
        )
        answer = post_json(gate.port, REPLICAS, {"service": service, "number": 2})
        assert answer.status == 201, answer.body
        assert world.inspect(answer.json()["Id"])["Config"]["Image"] == tag
        # The tag now means another image: the next clone names the template's image by id.
        world.client.api.tag("local/redis:7", f"local/gate-test-{world.uid}", "moving")
        answer = post_json(gate.port, REPLICAS, {"service": service, "number": 3})
        assert answer.status == 201, answer.body
        clone = world.inspect(answer.json()["Id"])
        assert clone["Config"]["Image"] == image.id and clone["Image"] == image.id
    finally:
        world.client.api.remove_image(tag, noprune=True)
