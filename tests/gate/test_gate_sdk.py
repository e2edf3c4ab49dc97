"""The docker SDK pointed at the gate reads and acts on managed containers as on the engine; the
environment's values never leave the gate; ``python -m scaler.gate`` serves with its token."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import docker.errors
import pytest
from gate_support import SECRET, TOKEN, GateServer, free_port, request
from gate_world import World

from scaler.gate.engine import Engine
from scaler.gate.rules import MANAGED_LABEL, PROJECT_LABEL

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def sdk(gate: GateServer) -> Iterator[docker.DockerClient]:
    # version given: "auto" would ask /version before the token header can be set.
    client = docker.DockerClient(
        base_url=f"tcp://127.0.0.1:{gate.port}", version="1.41", timeout=30
    )
    client.api.headers["Authorization"] = f"Bearer {TOKEN}"
    yield client
    client.close()


def test_the_sdk_lists_and_inspects_managed_containers_only(
    world: World, sdk: docker.DockerClient
) -> None:
    listed = {c.name for c in sdk.containers.list(all=True)}
    assert world.template in listed
    assert not {world.lookalike, world.other, world.oneoff} & listed
    narrowed = sdk.containers.list(all=True, filters={"label": "com.docker.compose.service=nope"})
    assert narrowed == []
    template = sdk.containers.get(world.template)
    assert template.labels[MANAGED_LABEL] == "true" and template.status == "running"
    assert template.attrs["Config"]["StopTimeout"] == 7
    assert "SECRET_TOKEN" in template.attrs["Config"]["Env"]
    assert SECRET not in json.dumps(template.attrs)
    assert "GraphDriver" not in template.attrs
    for name in (world.lookalike, world.other, world.oneoff):
        with pytest.raises(docker.errors.NotFound):
            sdk.containers.get(name)
    assert sdk.ping() is True
    assert sdk.version()["ApiVersion"] == "1.41"


def test_the_sdk_stops_starts_kills_waits_and_removes_a_managed_container(
    world: World, sdk: docker.DockerClient, managed: Callable[..., str]
) -> None:
    name = managed()
    container = sdk.containers.get(name)
    container.stop(timeout=1)
    container.reload()
    assert container.status == "exited" and not world.running(name)
    container.start()
    container.reload()
    assert container.status == "running" and world.running(name)
    container.kill(signal="SIGTERM")
    assert container.wait(timeout=30)["StatusCode"] in (0, 143)
    with pytest.raises(docker.errors.APIError) as refused:
        container.remove(v=True)
    assert refused.value.status_code == 403 and world.exists(name)
    container.remove(force=True)
    assert not world.exists(name)


def test_what_the_sdk_is_refused(world: World, sdk: docker.DockerClient) -> None:
    before = world.names()
    attempts: list[Callable[[], Any]] = [
        lambda: sdk.containers.create("local/python:3.11", ["true"], name=f"{world.project}-x"),
        lambda: sdk.containers.run("local/python:3.11", ["true"], privileged=True, detach=True),
        lambda: sdk.api.exec_create(world.template, ["id"]),
        lambda: sdk.images.list(),
        lambda: sdk.images.pull("alpine"),
        lambda: sdk.networks.list(),
        lambda: sdk.volumes.create("x"),
        lambda: sdk.api.connect_container_to_network(world.template, world.networks[0]),
        lambda: sdk.api.restart(world.template),
        lambda: sdk.api.logs(world.template),
        lambda: sdk.api.update_container(world.template, mem_limit="1g"),
    ]
    for attempt in attempts:
        with pytest.raises(docker.errors.APIError) as refused:
            attempt()
        assert refused.value.status_code == 403
        assert "is not an operation of the gate" in str(refused.value.explanation)
    lookalike = world.inspect(world.lookalike)["Id"]
    for act in (sdk.api.stop, sdk.api.kill, sdk.api.remove_container, sdk.api.start):
        with pytest.raises(docker.errors.NotFound):
            act(lookalike)
    assert world.names() == before and world.running(world.lookalike)


def test_the_sdk_reads_stats_once_and_streamed(world: World, sdk: docker.DockerClient) -> None:
    once = sdk.containers.get(world.template).stats(stream=False)
    assert "cpu_stats" in once and "memory_stats" in once
    streamed = sdk.api.stats(world.template, stream=True, decode=True)
    first, second = next(streamed), next(streamed)
    assert "cpu_stats" in first and "precpu_stats" in second
    streamed.close()
    with pytest.raises(docker.errors.NotFound):
        sdk.api.stats(world.lookalike, stream=False)


def test_events_show_managed_containers_only_and_no_exec(
    world: World, gate: GateServer, sdk: docker.DockerClient, managed: Callable[..., str]
) -> None:
    since = int(time.time()) - 1
    name = managed()
    sdk.api.stop(name, timeout=1)
    world.client.api.stop(world.lookalike, timeout=1)
    world.client.api.start(world.lookalike)
    exec_id = world.client.api.exec_create(world.template, ["echo", SECRET])
    world.client.api.exec_start(exec_id)
    time.sleep(1.1)
    until = int(time.time()) + 1
    events = list(sdk.events(since=since, until=until, decode=True))
    assert events, "no event"
    actors = {e["Actor"]["Attributes"].get("name") for e in events}
    assert name in actors and world.lookalike not in actors
    actions = {e["Action"] for e in events if e["Actor"]["Attributes"]["name"] == name}
    assert {"create", "start", "kill", "die", "stop"} <= actions
    for event in events:
        assert event["Type"] == "container"
        assert not event["Action"].startswith("exec_"), event
        assert event["Actor"]["Attributes"][PROJECT_LABEL] == world.project
    assert SECRET not in json.dumps(events)
    # Caller filters only narrow; a type other than container is refused.
    only_stop = list(sdk.events(since=since, until=until, decode=True, filters={"event": "stop"}))
    assert only_stop and {e["Action"] for e in only_stop} == {"stop"}
    # (The SDK's event stream swallows an HTTP error as the end of the stream: ask raw.)
    image = quote(json.dumps({"type": ["image"]}))
    answer = request(gate.port, "GET", f"/events?since={since}&until={until}&filters={image}")
    assert answer.status == 400 and "only container events" in answer.message
    assert list(sdk.events(since=since, until=until, filters={"type": "image"})) == []


def test_a_followed_event_stream_delivers_and_ends_with_its_caller(
    world: World, gate: GateServer, sdk: docker.DockerClient, managed: Callable[..., str]
) -> None:
    name = managed(start=False)
    stream = sdk.events(decode=True, filters={"event": "start"})
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend([next(stream)]), daemon=True)
    reader.start()
    time.sleep(0.5)
    world.client.api.start(name)
    reader.join(15)
    assert got and got[0]["Actor"]["Attributes"]["name"] == name
    stream.close()
    # The gate goes on serving (the closed stream held no slot of it).
    for _ in range(20):
        assert request(gate.port, "GET", "/_ping").status == 200


def test_no_answer_of_the_gate_shows_an_environment_value(world: World, gate: GateServer) -> None:
    """Every read, by name and by id (request() asserts the secret is in no body)."""
    cid = world.inspect(world.template)["Id"]
    for ref in (world.template, cid, cid[:12]):
        shown = request(gate.port, "GET", f"/containers/{ref}/json").json()
        assert shown["Config"]["Env"][:2] == ["SECRET_TOKEN", "PLAIN_SETTING"]
        assert all("=" not in e for e in shown["Config"]["Env"])
        assert request(gate.port, "GET", f"/containers/{ref}/stats?stream=false").status == 200
    for path in ("/containers/json?all=1", "/gate/v1/status", "/version", "/info"):
        assert request(gate.port, "GET", path).status == 200
    until = int(time.time())
    events = request(gate.port, "GET", f"/events?since={until - 600}&until={until}")
    assert events.status == 200


def test_python_m_scaler_gate_serves_with_its_token(world: World, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "DOCKER_HOST"))}
    missing = subprocess.run(
        [sys.executable, "-m", "scaler.gate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "GATE_PROJECT" in missing.stderr
    env["GATE_PROJECT"] = world.project
    no_token = subprocess.run(
        [sys.executable, "-m", "scaler.gate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert no_token.returncode == 2 and "GATE_TOKEN_FILE" in no_token.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    env.update(GATE_TOKEN_FILE=str(token_file), GATE_LISTEN=f"127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaler.gate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = request(port, "GET", f"/containers/{world.template}/json")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert answer.status == 200 and answer.json()["Name"] == f"/{world.template}"
        assert request(port, "GET", "/_ping", token=None).status == 401
        assert request(port, "POST", "/containers/create", b"{}").status == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    log = out.decode()
    assert '"kind": "unauthorised"' in log and '"kind": "not-an-operation"' in log, log


class CountingEngine(Engine):
    """The real engine, counting the connections open to it."""

    def __init__(self) -> None:
        super().__init__()
        self.open_now = 0

    @asynccontextmanager
    async def open(self, *args: Any, **kwargs: Any) -> AsyncIterator[tuple[int, Any]]:
        self.open_now += 1
        try:
            async with super().open(*args, **kwargs) as answer:
                yield answer
        finally:
            self.open_now -= 1


@pytest.mark.parametrize(
    "target",
    [
        "/containers/{name}/wait?condition=not-running",
        "/events?filters=%7B%22event%22%3A%5B%22oom%22%5D%7D",
        "/containers/{name}/stats?stream=1",
        "/containers/{name}/stop?t=5",
    ],
)
def test_a_caller_going_away_ends_the_engine_call_it_held(
    world: World, managed: Callable[..., str], target: str
) -> None:
    from gate_world import settings_for

    name = managed(init=False, stop_timeout=5)  # sleep as PID 1: a stop waits out its grace
    engine = CountingEngine()
    # Without the snapshot, whose event stream would hold an engine connection of its own.
    with GateServer(settings_for(world, snapshot=False), engine) as server:
        method = "GET" if target.startswith(("/events", "/containers/{name}/stats")) else "POST"
        head = (
            f"{method} {target.replace('{name}', name)} HTTP/1.1\r\nHost: g\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head.encode())
            deadline = time.monotonic() + 10
            while engine.open_now == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.3)
            assert engine.open_now == 1
        deadline = time.monotonic() + 3
        while engine.open_now:
            assert time.monotonic() < deadline, "the engine call outlived its caller"
            time.sleep(0.05)
