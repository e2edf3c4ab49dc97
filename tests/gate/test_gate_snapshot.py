"""The gate's snapshot of the managed containers (``GET /gate/v1/snapshot``), on the real engine.

A project of the test's own (``cst-test-snap-<id>``) with containers the gate does not manage but
that look like its own (an unmanaged one of the same service and numbering, a one-off, a managed
container of another project whose name starts the same), and a gate for it. Checked: the
snapshot follows create, start, stop, a death, health changes and removal of real containers;
never shows a container outside the scope nor an environment value; lists again after its event
stream breaks (a proxy between the gate and the engine cut and restored, a change made during
the gap shown after); and the Compose backend reads the same containers, states, lifetimes, CPU
limits and worker names from it as from the engine's listing and inspections.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import pytest
from celery import Celery
from gate_support import SECRET, GateServer, free_port
from gate_world import IMAGE, World, cleanup, engine_or_skip, settings_for

from scaler.backends.base import ServiceSpec
from scaler.backends.compose import ComposeBackend, cpu_limit, lifetime_s, worker_node_name
from scaler.backends.engine import gate_call
from tests.support.polling import poll_until

pytestmark = pytest.mark.docker

SEED = random.randrange(2**32)
RNG = random.Random(SEED)
print(f"test_gate_snapshot: random seed {SEED}")  # the containers' numbers come from it


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    client = engine_or_skip()
    uid = uuid.uuid4().hex[:10]
    project = f"cst-test-snap-{uid}"
    try:
        # Another project whose name the gate's own starts with: a prefix is not a match.
        w = World(uid, project, f"{project}-x", client, networks=[], volume="")
        w.lookalike = f"{project}-worker-s-1-lookalike"
        w.create(w.lookalike, w.labels("worker-s", 1, managed=False))
        w.oneoff = f"{project}-worker-s-run-1"
        w.create(w.oneoff, w.labels("worker-s", 1, oneoff=True))
        w.other = f"{w.other_project}-worker-s-1"
        w.create(w.other, w.labels("worker-s", 1, project=w.other_project))
        yield w
    finally:
        cleanup(client, uid)
        client.close()


@pytest.fixture(scope="module")
def gate(world: World) -> Iterator[GateServer]:
    with GateServer(settings_for(world)) as server:
        yield server


def _get(gate: GateServer, path: str) -> dict[str, Any]:
    client = gate.clients()()
    try:
        return dict(gate_call(client, "GET", path))
    finally:
        client.close()


def _snapshot(gate: GateServer) -> dict[str, Any]:
    return _get(gate, "/gate/v1/snapshot")


def _status(gate: GateServer) -> dict[str, Any]:
    return _get(gate, "/gate/v1/status")


def _by_name(gate: GateServer) -> dict[str, dict[str, Any]]:
    """The snapshot's entries by container name, once it is served; checked for scope and for
    environment values on the way."""

    def served() -> dict[str, Any] | None:
        try:
            return _snapshot(gate)
        except docker.errors.APIError as exc:
            if exc.status_code == 503:  # not ready yet
                return None
            raise

    answer = poll_until(served, "the gate's snapshot to be served", 30)
    assert SECRET not in str(answer) and "Env" not in str(answer)
    entries = {str(e["Name"]).lstrip("/"): e for e in answer["containers"]}
    for name, e in entries.items():
        labels = e["Config"]["Labels"]
        assert labels["autoscale.managed"] == "true", name
        assert labels["com.docker.compose.project"] == answer["scope"]["value"], name
        assert labels["com.docker.compose.oneoff"] == "False", name
    return entries


def _state(gate: GateServer, name: str) -> dict[str, Any] | None:
    entry = _by_name(gate).get(name)
    return None if entry is None else dict(entry["State"])


def _until(
    gate: GateServer, name: str, what: str, test: Callable[[dict[str, Any] | None], bool]
) -> None:
    poll_until(lambda: test(_state(gate, name)), f"{name}: {what} in the snapshot", 30)


def _healthchecked(world: World, name: str, number: int, service: str = "worker-s") -> str:
    """A managed container whose health is the file /tmp/ok (probed every 0.2 s)."""
    api = world.client.api
    created = api.create_container(
        IMAGE,
        command=["sleep", "infinity"],
        name=name,
        labels=world.labels(service, number),
        environment=[f"SECRET_TOKEN={SECRET}"],
        host_config=api.create_host_config(init=True),
        healthcheck={"Test": ["CMD", "test", "-f", "/tmp/ok"], "Interval": 200_000_000,
                     "Timeout": 2_000_000_000, "Retries": 1},
    )  # fmt: skip
    api.start(created["Id"])
    return str(created["Id"])


def test_the_snapshot_follows_real_containers_and_stays_in_scope(
    world: World, gate: GateServer
) -> None:
    api = world.client.api
    first = _by_name(gate)
    assert set(first) == set(), f"only managed containers of the project: {sorted(first)}"
    number = RNG.randrange(2, 90)
    name = f"{world.project}-worker-s-{number}"
    cid = world.create(name, world.labels("worker-s", number), start=False, stop_timeout=1)
    _until(gate, name, "created", lambda s: s is not None and s["Status"] == "created")

    api.start(cid)
    _until(gate, name, "running", lambda s: s is not None and s["Running"] is True)
    started = _by_name(gate)[name]
    assert started["Id"] == cid and started["Config"]["Hostname"] == cid[:12]
    assert started["Config"]["Cmd"] == ["sleep", "infinity"]

    api.stop(cid, timeout=1)
    _until(gate, name, "stopped", lambda s: s is not None and s["Status"] == "exited")
    api.start(cid)
    _until(gate, name, "running again", lambda s: s is not None and s["Running"] is True)
    api.kill(cid)  # SIGKILL: a death
    _until(
        gate,
        name,
        "dead by SIGKILL",
        lambda s: s is not None and s["Status"] == "exited" and s["ExitCode"] == 137,
    )
    assert lifetime_s(_by_name(gate)[name]) == lifetime_s(world.inspect(cid))

    checked = f"{world.project}-worker-s-{number + 100}"
    hid = _healthchecked(world, checked, number + 100)

    def health(want: str) -> Callable[[dict[str, Any] | None], bool]:
        return lambda s: s is not None and (s.get("Health") or {}).get("Status") == want

    _until(gate, checked, "unhealthy", health("unhealthy"))
    api.exec_start(api.exec_create(hid, ["touch", "/tmp/ok"])["Id"])
    _until(gate, checked, "healthy", health("healthy"))

    api.remove_container(cid, force=True)
    api.remove_container(hid, force=True)
    poll_until(lambda: not _by_name(gate), "the removed containers to leave the snapshot", 30)
    status = _status(gate)["snapshot"]
    assert status["ready"] is True and status["events"] > 0 and status["drift"] == 0, status
    for name in (world.lookalike, world.oneoff, world.other):
        assert world.exists(name)  # still there: left out of the snapshot, not removed


def test_the_gates_own_actions_show_in_its_very_next_snapshot(
    world: World, gate: GateServer
) -> None:
    """No waiting for the event: a caller reads what it has just done through the gate."""
    number = RNG.randrange(100, 190)
    name = f"{world.project}-worker-s-{number}"
    cid = world.create(name, world.labels("worker-s", number), start=False, stop_timeout=1)
    _until(gate, name, "created", lambda s: s is not None and s["Status"] == "created")
    client = gate.clients()()
    try:
        client.api.start(cid)
        assert (_state(gate, name) or {}).get("Running") is True
        client.api.stop(cid, timeout=1)
        assert (_state(gate, name) or {}).get("Status") == "exited"
        client.api.remove_container(cid)
        assert name not in _by_name(gate)
    finally:
        client.close()
        with contextlib.suppress(docker.errors.APIError):
            world.client.api.remove_container(cid, force=True)


class CuttableProxy:
    """A TCP port in front of the engine's socket whose connections can be cut (streams too)
    and which can refuse new ones for a while: the gate's engine, made to break."""

    def __init__(self, target: str = "/var/run/docker.sock") -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            engine.connect(self.target)
            with self._lock:
                self._conns += [client, engine]
            for src, dst in ((client, engine), (engine, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_the_snapshot_lists_again_after_its_event_stream_breaks(world: World) -> None:
    api = world.client.api
    number = RNG.randrange(200, 290)
    name = f"{world.project}-worker-s-{number}"
    cid = world.create(name, world.labels("worker-s", number), stop_timeout=1)
    proxy = CuttableProxy()
    proxy.up()
    try:
        with GateServer(settings_for(world, docker_host=proxy.url)) as gate:
            _until(gate, name, "running", lambda s: s is not None and s["Running"] is True)
            assert _status(gate)["snapshot"]["breaks"] == 0

            proxy.down()  # the event stream is cut; the engine is out of reach
            poll_until(
                lambda: _status(gate)["snapshot"]["ready"] is False,
                "the snapshot to stop being served after the break",
                30,
            )
            with pytest.raises(docker.errors.APIError) as refused:
                _snapshot(gate)
            assert refused.value.status_code == 503
            api.stop(cid, timeout=1)  # a change no event of the gate's will show
            proxy.up()

            _until(gate, name, "stopped (listed again)", lambda s: s is not None
                   and s["Status"] == "exited")  # fmt: skip
            status = _status(gate)["snapshot"]
            assert status["breaks"] >= 1 and status["listings"] >= 2, status
    finally:
        proxy.down()
        api.remove_container(cid, force=True)


def test_the_compose_backend_reads_the_same_from_the_snapshot_as_from_the_engine(
    world: World, gate: GateServer
) -> None:
    api = world.client.api
    base = RNG.randrange(300, 390) * 10
    made: list[str] = []

    def make(service: str, offset: int, **kwargs: Any) -> str:
        cid = world.create(
            f"{world.project}-{service}-{base + offset}",
            world.labels(service, base + offset),
            stop_timeout=1,
            **kwargs,
        )
        made.append(cid)
        return cid

    make("worker-a", 1, nano_cpus=500_000_000)
    make("worker-a", 2, command=["sh", "-c", "exec sleep infinity", "-n", "alpha@%h"])
    crashed = make("worker-a", 3, command=["sh", "-c", "exit 3"])
    make("worker-b", 1, start=False)
    stopped = make("worker-b", 2)
    api.stop(stopped, timeout=1)
    unhealthy = _healthchecked(
        world, f"{world.project}-worker-b-{base + 3}", base + 3, service="worker-b"
    )
    made.append(unhealthy)

    app = Celery("cst-test-snap", broker="memory://")
    specs = [ServiceSpec("worker-a", ("a",)), ServiceSpec("worker-b", ("b",))]
    with_snapshot = ComposeBackend(world.project, app, client_factory=gate.clients())
    without = ComposeBackend(world.project, app, client_factory=gate.clients(), use_snapshot=False)
    try:
        for backend in (with_snapshot, without):
            backend.manage(specs)

        def same() -> dict[str, Any] | None:
            seen = with_snapshot._list()
            listed = without._list()
            states = {c.name: (c.state, c.unhealthy) for cs in listed.values() for c in cs}
            settled = (
                states.get(f"{world.project}-worker-b-{base + 3}") == ("running", True)
                and states.get(f"{world.project}-worker-a-{base + 3}", ("",))[0] == "exited"
            )
            return seen if seen == listed and settled else None

        listing = poll_until(same, "the snapshot and the listing to agree", 30)
        assert with_snapshot.snapshots is not None and with_snapshot.snapshots.reads > 0
        assert without.snapshots is None
        assert {s: len(cs) for s, cs in listing.items()} == {"worker-a": 3, "worker-b": 3}
        for service in ("worker-a", "worker-b"):
            assert with_snapshot.replicas(service) == without.replicas(service)
            assert with_snapshot.warm(service) == without.warm(service)
            assert with_snapshot.workers(service) == without.workers(service)
        for cs in listing.values():
            for c in cs:
                entry, inspected = with_snapshot._inspected(c.id), without._inspected(c.id)
                assert entry is not inspected and "Env" not in entry["Config"]
                assert cpu_limit(entry) == cpu_limit(inspected), c.name
                assert lifetime_s(entry) == lifetime_s(inspected), c.name
                assert worker_node_name(entry) == worker_node_name(inspected), c.name
        exits = {c.id: c.exit_code for cs in listing.values() for c in cs}
        assert exits[crashed] == 3 and exits[stopped] is not None, exits
        assert [c.id for c in listing["worker-b"] if c.unhealthy] == [unhealthy]
    finally:
        with_snapshot.close()
        without.close()
        for cid in made:
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(cid, force=True)
