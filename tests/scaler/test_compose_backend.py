"""The Compose backend against the real Docker engine and real Celery workers in containers.

Each test brings up its own small Compose project (cst-test-compose-*, see
fixtures/compose_worker/compose.yaml): a Redis broker published on 127.0.0.1, one managed worker
service (`worker`, opted in with autoscale.managed=true) and a `bystander` the backend must never
touch. The worker image is built once per session from a host-built wheelhouse. The backend
reaches the engine as in the stack: only through an engine gate for the project (scaler.gate,
served in this process: tests/gate/gate_support.py); the test itself reads the engine directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from celery import Celery
from scaler_support import free_port
from support.polling import poll_until

from scaler.backends.base import Backend, BackendError, ServiceSpec
from scaler.backends.compose import ComposeBackend, ComposeContainer, worker_node_name
from scaler.backends.restart_backoff import RestartBackoff
from scaler.backends.warm_pool import RedisPoolStore
from scaler.loop import PolicySource, Scaler
from scaler.policy import parse_policy
from scaler.restore import RESTORED, UnackedRestorer
from scaler.signals.collector import Collector
from scaler.signals.containers import resources_from_sample
from scaler.signals.redis_queues import RedisQueueReader
from tests.gate.gate_support import GateServer, project_gate

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "compose_worker"
# The image's files: the fixture's own, and the worker's warm-start step as the stack has it.
IMAGE_FILES = {
    "Dockerfile": FIXTURE / "Dockerfile",
    "worker_app.py": FIXTURE / "worker_app.py",
    "warm_start.py": FIXTURE.parents[3] / "services" / "warm_start.py",
    "ownership.py": FIXTURE.parents[3] / "services" / "ownership.py",
}
SPEC = ServiceSpec("worker", ("work",))


def _docker_ready() -> bool:
    try:
        docker.from_env(timeout=5).ping()
    except Exception:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


if not _docker_ready():  # pragma: no cover - CI always has the engine
    pytest.skip("needs a Docker engine with the compose plugin", allow_module_level=True)


# -- the worker image, built once per session ----------------------------------------------------


@pytest.fixture(scope="session")
def worker_image() -> str:
    """A tiny Celery worker image; rebuilt only when its inputs change (tag = their hash)."""
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("celery", "redis", "packaging")]
    pins.append("async-timeout>=4.0.3")  # redis needs it below Python 3.11.3 (Debian's 3.11.2)
    digest = hashlib.sha256()
    for source in IMAGE_FILES.values():
        digest.update(source.read_bytes())
    digest.update(" ".join(pins).encode())
    python_image = os.environ.get("PYTHON_IMAGE", "python:3.11-slim")
    digest.update(python_image.encode())
    tag = f"cst-test-compose-worker:{digest.hexdigest()[:12]}"
    client = docker.from_env()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="cst-compose-ctx-") as ctx:
        for name, source in IMAGE_FILES.items():
            (Path(ctx) / name).write_bytes(source.read_bytes())
        wheels = Path(ctx) / "wheels"
        links = ["--find-links", ".wheelhouse"] if Path(".wheelhouse").is_dir() else []
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "-w", str(wheels), *links, *pins],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["docker", "build", "-q", "--build-arg", f"PYTHON_IMAGE={python_image}",
             "-t", tag, ctx],
            check=True, capture_output=True,
        )  # fmt: skip
    return tag


# -- one Compose project per test -----------------------------------------------------------------


@dataclass
class Stack:
    """A running test project: how to drive it with `docker compose` and reach its broker."""

    project: str
    env: dict[str, str]
    app: Celery
    gate: GateServer | None = None  # the project's engine gate: the backend's only way in

    def clients(self, timeout_s: int = 30) -> Any:
        """The backend's engine clients: through the project's gate."""
        assert self.gate is not None, "the stack's gate is not running"
        return self.gate.clients(timeout_s)

    def compose(self, *args: str, check: bool = True) -> str:
        cmd = ["docker", "compose", "-p", self.project, "-f", str(FIXTURE / "compose.yaml"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def ps(self, service: str, *, all_states: bool = False) -> list[dict[str, Any]]:
        """`docker compose ps` rows of one service: what Compose itself thinks it runs."""
        out = self.compose("ps", "--format", "json", *(["-a"] if all_states else []), service)
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["Name"])

    def names(self, service: str) -> list[str]:
        return [r["Name"] for r in self.ps(service)]


@pytest.fixture
def stack(worker_image: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The project; a test parametrizes it indirectly with extra environment (CST_WORKER_POOL)."""
    project = f"cst-test-compose-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CST_WORKER_IMAGE": worker_image, **getattr(request, "param", {})}
    env.setdefault("REDIS_IMAGE", "redis:7")
    app = Celery("cst-test-client")
    s = Stack(project, env, app)
    with project_gate(project) as s.gate:
        try:
            s.compose("up", "-d", "--wait", "--wait-timeout", "120")
            port = s.compose("port", "redis", "6379").strip().rsplit(":", 1)[1]
            url = f"redis://127.0.0.1:{port}/0"
            app.conf.update(
                broker_url=url,
                result_backend=url,
                task_serializer="json",
                accept_content=["json"],
                result_accept_content=["json"],
            )
            poll_until(lambda: app.control.ping(timeout=0.5), "worker-1 to answer a ping", 60)
            yield s
        finally:
            if sys.exc_info()[0] is not None:
                print(s.compose("ps", "-a", check=False), s.compose("logs", check=False))
            s.compose("down", "-v", "-t", "0", "--remove-orphans", check=False)
            app.close()


@pytest.fixture
def backend(stack: Stack) -> Iterator[ComposeBackend]:
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), drain_timeout_s=60,
        stats_stale_after_s=3,
    )  # fmt: skip
    b.manage([SPEC])
    try:
        yield b
    finally:
        b.close()


def _drained(b: ComposeBackend, seen: list[Any]) -> bool:
    """Collect reconcile() events until no drain is in progress."""
    seen.extend(b.reconcile())
    return b.health().extra["draining"] == 0


def _await_worker(stack: Stack, node: str) -> None:
    poll_until(lambda: stack.app.control.ping([node], timeout=0.5), f"{node} to answer a ping", 30)


def _node(container: str) -> str:
    """The fixture's workers are named ``$WORKER_QUEUE@%h`` (work@<container hostname>)."""
    return f"work@{docker.from_env().api.inspect_container(container)['Config']['Hostname']}"


# -- scaling up: clones Compose recognises --------------------------------------------------------


def test_scale_up_clones_are_listed_and_removed_by_compose(
    stack: Stack, backend: ComposeBackend
) -> None:
    assert isinstance(backend, Backend)
    assert backend.replicas("worker") == 1
    one = docker.from_env().api.inspect_container(f"{stack.project}-worker-1")

    result = backend.scale("worker", 3)

    assert (result.before, result.after) == (1, 3)
    clones = [f"{stack.project}-worker-2", f"{stack.project}-worker-3"]
    assert sorted(result.started) == clones
    assert stack.names("worker") == [f"{stack.project}-worker-1", *clones]
    assert backend.replicas("worker") == 3
    for name in clones:
        clone = docker.from_env().api.inspect_container(name)
        labels = clone["Config"]["Labels"]
        assert (
            labels["com.docker.compose.config-hash"]
            == (one["Config"]["Labels"]["com.docker.compose.config-hash"])
        )
        assert labels["com.docker.compose.container-number"] == name.rsplit("-", 1)[1]
        assert clone["Config"]["StopTimeout"] == 30  # stop_grace_period survived the clone
        assert clone["Config"]["Hostname"] != one["Config"]["Hostname"]
        (network,) = clone["NetworkSettings"]["Networks"].values()
        assert {name, "worker"} <= set(network["Aliases"])
        # A real worker runs in it, under the node name the backend derives.
        _await_worker(stack, _node(name))
    assert len(stack.names("bystander")) == 1  # never touched

    # A plain `up` resets the count to the file's without recreating replica 1; converge again.
    stack.compose("up", "-d", "--wait")
    assert stack.names("worker") == [f"{stack.project}-worker-1"]
    assert docker.from_env().api.inspect_container(one["Id"])["Id"] == one["Id"]
    assert backend.replicas("worker") == 1
    assert backend.scale("worker", 2).after == 2
    assert len(stack.names("worker")) == 2

    stack.compose("down", "-t", "0")
    left = docker.from_env().containers.list(
        all=True, filters={"label": f"com.docker.compose.project={stack.project}"}
    )
    assert left == []


# -- scaling down: idle workers only, drained first -----------------------------------------------


def test_scale_down_drains_an_idle_worker_and_never_a_busy_one(
    stack: Stack, backend: ComposeBackend
) -> None:
    backend.scale("worker", 2)
    one, two = (f"{stack.project}-worker-{n}" for n in (1, 2))
    node_one, node_two = _node(one), _node(two)
    _await_worker(stack, node_two)
    # Make the highest number (the one Compose would remove first) the busy one: worker-1 stops
    # consuming while the task is sent, so only worker-2 can take it.
    stack.app.control.cancel_consumer("work", destination=[node_one], reply=True)
    release = f"release-{uuid.uuid4().hex}"
    task = stack.app.send_task("cst.hold", args=[release, 120], queue="work")

    def running_on_two() -> bool:
        active = stack.app.control.inspect([node_two], timeout=0.5).active() or {}
        return bool(active.get(node_two))

    poll_until(running_on_two, "the task to start on worker-2", 30)
    stack.app.control.add_consumer("work", destination=[node_one], reply=True)

    result = backend.scale("worker", 1)

    assert result.draining == (one,)  # the idle one, although it has the lower number
    # Node names confirmed with the workers (the command line only says "$WORKER_QUEUE@%h").
    states = {w.name: w.state for w in backend.workers("worker")}
    assert states[node_two] == "running" and states.get(node_one, "draining") == "draining"
    assert backend.replicas("worker") == 1
    events: list[Any] = []
    poll_until(lambda: _drained(backend, events), "the drain of worker-1", 60)
    assert [e.kind for e in events] == ["drained"], events
    assert stack.names("worker") == [two]

    # Only a busy worker is left: scaling to zero must hold and say so, not stop it.
    held = backend.scale("worker", 0)
    assert held.draining == () and held.after == 1
    assert [e.kind for e in backend.reconcile()] == ["scale-down-held"]
    assert not task.ready()
    redis.Redis.from_url(stack.app.conf.broker_url).rpush(release, 1)
    assert (
        task.get(timeout=30) == docker.from_env().api.inspect_container(two)["Config"]["Hostname"]
    )
    assert stack.names("worker") == [two]


def test_scale_to_zero_parks_the_last_worker_and_wakes_it(
    stack: Stack, backend: ComposeBackend
) -> None:
    first = docker.from_env().api.inspect_container(f"{stack.project}-worker-1")["Id"]

    assert backend.scale("worker", 0).draining == (f"{stack.project}-worker-1",)
    events: list[Any] = []
    poll_until(lambda: _drained(backend, events), "the drain to zero", 60)
    assert backend.replicas("worker") == 0
    assert stack.names("worker") == []
    (parked,) = stack.ps("worker", all_states=True)
    assert parked["State"] == "exited" and parked["ExitCode"] == 0  # warm shutdown, kept
    assert backend.reconcile() == []  # a parked worker is not "dead": no replacement

    assert backend.scale("worker", 1).started == (f"{stack.project}-worker-1",)
    assert backend.replicas("worker") == 1
    assert docker.from_env().api.inspect_container(f"{stack.project}-worker-1")["Id"] == first


# -- the warm pool ---------------------------------------------------------------------------------


def test_warm_pool_promotes_refills_returns_to_the_pool_and_trims(stack: Stack) -> None:
    store = RedisPoolStore.from_url(stack.app.conf.broker_url)
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), drain_timeout_s=60,
        pool_store=store,
    )  # fmt: skip
    b.manage([SPEC])
    client = docker.from_env()
    one, two, three = (f"{stack.project}-worker-{n}" for n in (1, 2, 3))
    try:
        up = b.scale("worker", 1, warm=1)
        assert up.warm_started == (two,) and (b.replicas("worker"), b.warm("worker")) == (1, 1)
        env = client.api.inspect_container(two)["Config"]["Env"]
        assert "WORKER_WARM_START=1" in env, "the clone boots consuming nothing"
        assert b.wait_for_warm(60.0)
        node_two = _node(two)
        queues = stack.app.control.inspect([node_two], timeout=1.0).active_queues() or {}
        assert queues == {node_two: []}

        # worker-1 is busy; the scale-up promotes worker-2 (no cold start) and refills the pool.
        release = f"release-{uuid.uuid4().hex}"
        held = stack.app.send_task("cst.hold", args=[release, 120], queue="work")
        poll_until(lambda: (stack.app.control.inspect([_node(one)], timeout=0.5).active() or {})
                   .get(_node(one)), "worker-1 to take the task", 30)  # fmt: skip
        grown = b.scale("worker", 2, warm=1)
        assert grown.promoted == (two,) and grown.warm_started == (three,), grown
        second = stack.app.send_task("cst.hold", args=[release, 120], queue="work")
        poll_until(lambda: (stack.app.control.inspect([node_two], timeout=0.5).active() or {})
                   .get(node_two), "the promoted worker-2 to take the next task", 30)  # fmt: skip
        redis.Redis.from_url(stack.app.conf.broker_url).rpush(release, 1, 1)
        hostnames = {held.get(timeout=30), second.get(timeout=30)}
        assert client.api.inspect_container(three)["Config"]["Hostname"] not in hostnames
        assert b.wait_for_warm(60.0)

        # Scale-down while the pool is short: the drained worker is kept warm, nothing stops.
        down = b.scale("worker", 1, warm=2)
        assert len(down.to_pool) == 1 and down.draining == (), down
        events: list[Any] = []
        poll_until(lambda: _drained(b, events), "the drain into the pool", 60)
        assert "returned-to-pool" in [e.kind for e in events], events
        assert (b.replicas("worker"), b.warm("worker")) == (1, 2)
        assert stack.names("worker") == [one, two, three]

        # The pool trimmed to zero: its idle members are stopped and removed.
        trimmed = b.scale("worker", 1, warm=0)
        assert len(trimmed.warm_stopped) == 2
        poll_until(lambda: _drained(b, events), "the warm members to stop", 60)
        assert (b.replicas("worker"), b.warm("worker")) == (1, 0)
        assert len(stack.names("worker")) == 1 and store.members("worker") == set()
    finally:
        b.close()


def test_a_scale_up_to_max_takes_a_booting_warm_member_never_a_container_over_max(
    stack: Stack,
) -> None:
    """Serving 1 + warm 1 still booting, then a decision for 2 serving with no room left for
    the pool (warm 0): the booting member is taken as serving (committed) instead of a cold
    clone started beside it while it is stopped (one container over max for seconds)."""
    store = RedisPoolStore.from_url(stack.app.conf.broker_url)
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), drain_timeout_s=60,
        pool_store=store,
    )  # fmt: skip
    b.manage([SPEC])
    two = f"{stack.project}-worker-2"
    try:
        assert b.scale("worker", 1, warm=1).warm_started == (two,)
        assert b._pool.node(docker.from_env().api.inspect_container(two)["Id"]) is None
        up = b.scale("worker", 2, warm=0)
        assert up.committed == (two,) and up.started == (two,), up
        assert up.warm_stopped == () and (b.replicas("worker"), b.warm("worker")) == (2, 0)
        assert len(stack.names("worker")) == 2, "a container beside the two allowed"
        node_two = _node(two)
        events: list[Any] = []

        def serving() -> bool:
            events.extend(b.reconcile())
            replies = stack.app.control.inspect([node_two], timeout=1.0).active_queues() or {}
            return [q["name"] for q in replies.get(node_two, [])] == ["work"]

        poll_until(serving, "the committed worker-2 consuming", 60)
        assert len(stack.names("worker")) == 2
        poll_until(lambda: events.extend(b.reconcile()) or "warm-committed" in
                   [e.kind for e in events], "the commit reported", 30)  # fmt: skip
        assert "consumers-restored" not in [e.kind for e in events], events
    finally:
        b.close()


def test_busy_replicas_a_scale_down_cannot_remove_take_the_pool_s_room(stack: Stack) -> None:
    """Two serving replicas, both busy, and a decision for 1 serving + 1 warm: only idle ones
    are drained, none is, so the pool is not refilled beside them (3 containers, past max)."""
    store = RedisPoolStore.from_url(stack.app.conf.broker_url)
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), drain_timeout_s=60,
        pool_store=store,
    )  # fmt: skip
    b.manage([SPEC])
    release = f"release-{uuid.uuid4().hex}"
    try:
        b.scale("worker", 2)
        nodes = [_node(name) for name in stack.names("worker")]
        for node in nodes:
            _await_worker(stack, node)
        held = [stack.app.send_task("cst.hold", args=[release, 120], queue="work") for _ in nodes]

        def both_busy() -> bool:
            active = stack.app.control.inspect(nodes, timeout=0.5).active() or {}
            return all(active.get(node) for node in nodes)

        poll_until(both_busy, "both replicas to take a task", 30)
        down = b.scale("worker", 1, warm=1)
        assert down.after == 2 and down.draining == () and down.to_pool == (), down
        assert down.warm_started == () and len(stack.names("worker")) == 2, down
        assert store.members("worker") == set()
        redis.Redis.from_url(stack.app.conf.broker_url).rpush(release, 1, 1)
        for task in held:
            task.get(timeout=30)
    finally:
        b.close()


# -- a dead container is replaced -----------------------------------------------------------------


def test_killed_container_is_reported_and_replaced(stack: Stack, backend: ComposeBackend) -> None:
    backend.scale("worker", 2)
    victim = docker.from_env().api.inspect_container(f"{stack.project}-worker-2")
    docker.from_env().api.kill(victim["Id"])
    poll_until(lambda: backend.replicas("worker") == 1, "the kill to show", 30)
    assert [w.state for w in backend.workers("worker")] == ["running", "dead"]

    events = backend.reconcile()

    assert [e.kind for e in events] == ["replaced"]
    assert "exit code 137" in events[0].detail
    assert backend.replicas("worker") == 2
    fresh = docker.from_env().api.inspect_container(f"{stack.project}-worker-2")
    assert fresh["Id"] != victim["Id"]
    _await_worker(stack, _node(fresh["Id"]))


def test_a_container_crashing_on_start_is_replaced_with_backoff(stack: Stack) -> None:
    """The same rule as the local backend's (scaler.backends.restart_backoff), on the engine."""
    delays = (2.0, 4.0)  # base and cap, short to keep the test short
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), stats_stale_after_s=3,
        restart_backoff=RestartBackoff(
            crash_window_s=30.0, base_delay_s=delays[0], max_delay_s=delays[1]
        ),
    )  # fmt: skip
    b.manage([SPEC, ServiceSpec("crasher", ("crash",))])
    try:
        stack.compose("up", "-d", "crasher")  # exits 3 at once
        seen: list[tuple[float, Any]] = []
        start = time.monotonic()
        held_checked = False
        while time.monotonic() - start < 12.0:
            seen += [(time.monotonic(), e) for e in b.reconcile() if e.service == "crasher"]
            if not held_checked and any(e.kind == "crash-loop" for _, e in seen):
                held = b.scale("crasher", 1)  # a scale-up waits out the backoff too
                assert (held.after, held.started) == (0, ())
                assert b.health().extra["crash_loop"]["crasher"]["crashes"] == 2
                assert [w.state for w in b.workers("crasher")] == ["dead"]  # kept until then
                held_checked = True
            time.sleep(0.5)  # the loop's reconcile interval, not a synchronisation
        replaced = [t for t, e in seen if e.kind == "replaced"]
        loops = [(t, e) for t, e in seen if e.kind == "crash-loop"]
        # Without backoff the crasher is recreated at every reconcile (about 12 here).
        assert 2 <= len(replaced) <= 4, [e for _, e in seen]
        assert held_checked
        announced = [float(e.detail.rsplit("next start in ", 1)[1].split()[0]) for _, e in loops]
        assert announced[:2] == list(delays), announced
        assert "crasher" in loops[0][1].service and "2 crashes" in loops[0][1].detail
        for at, delay in zip((t for t, _ in loops), announced, strict=True):
            after = [t for t in replaced if t > at]
            if after:
                assert after[0] - at >= delay - 0.5, (delay, after[0] - at)
    finally:
        b.close()
        stack.compose("rm", "-f", "-s", "-v", "crasher", check=False)


# -- the engine unreachable for a while -----------------------------------------------------------


class SwitchableDockerProxy:
    """A TCP front for the Docker socket that the test can cut and restore.

    Stands in for an engine outage: stopping the real engine would take every other test (and
    the machine's own containers) down with it.
    """

    def __init__(self) -> None:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        if not host.startswith("unix://"):
            pytest.skip(f"DOCKER_HOST={host!r}: this test proxies a unix socket")
        self.target = host.removeprefix("unix://")
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
        """Refuse new connections and cut the open ones (streams included)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the blocked accept() (close alone won't)
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


@pytest.fixture
def proxy() -> Iterator[SwitchableDockerProxy]:
    p = SwitchableDockerProxy()
    p.up()
    try:
        yield p
    finally:
        p.down()


@pytest.fixture
def proxied_gate(stack: Stack, proxy: SwitchableDockerProxy) -> Iterator[GateServer]:
    """The project's gate reaching the engine through the switchable front: the outage is the
    engine's, behind the gate (the backend's connection to the gate stays up)."""
    with project_gate(stack.project, docker_host=proxy.url) as gate:
        yield gate


def test_engine_unreachable_holds_reports_and_recovers(
    stack: Stack, proxy: SwitchableDockerProxy, proxied_gate: GateServer
) -> None:
    b = ComposeBackend(
        stack.project,
        stack.app,
        client_factory=proxied_gate.clients(timeout_s=5),
        attempts=2,
        backoff_s=0.1,
        stats_stale_after_s=3,
    )
    b.manage([SPEC])
    try:
        b.scale("worker", 2)
        b.reconcile()  # starts the stats readers
        poll_until(lambda: b.resources("worker").memory_percent, "container stats", 30)

        proxy.down()
        with pytest.raises(BackendError, match="list containers"):
            b.replicas("worker")
        health = b.health()
        assert not health.ok and "ping the Docker engine" in health.detail
        with pytest.raises(BackendError):
            b.scale("worker", 0)  # never a blind scale-down
        with pytest.raises(BackendError):
            b.reconcile()
        # The streamed samples go stale and read as missing, never as zero.
        poll_until(lambda: b.resources("worker").memory_percent is None, "stale stats", 20)
        direct = docker.from_env().containers.list(
            filters={"label": [f"com.docker.compose.project={stack.project}",
                               "com.docker.compose.service=worker"]}
        )  # fmt: skip
        assert len(direct) == 2 and all(c.status == "running" for c in direct)

        proxy.up()
        assert poll_until(lambda: b.health().ok, "health after the outage", 20)
        assert b.replicas("worker") == 2
        b.reconcile()
        poll_until(lambda: b.resources("worker").memory_percent, "stats after the outage", 30)
        assert b.scale("worker", 1).after == 1
        events: list[Any] = []
        poll_until(lambda: _drained(b, events), "the drain after the outage", 60)
        assert [e.kind for e in events] == ["drained"]
        assert len(stack.names("worker")) == 1
    finally:
        b.close()


# -- one container listing per cycle --------------------------------------------------------------


class CountingClients:
    """Real engine clients whose container-list and container-inspect calls are counted.

    Instrumentation, not a mock: every call still goes to the real engine (through the gate) and
    returns its answer.
    """

    def __init__(self, gate: GateServer | None) -> None:
        assert gate is not None
        self._make = gate.clients(timeout_s=5)
        self.lists = 0
        self.inspects = 0

    def __call__(self) -> docker.DockerClient:
        client = self._make()
        real_list, real_inspect = client.api.containers, client.api.inspect_container

        def counted_list(*args: Any, **kwargs: Any) -> Any:
            self.lists += 1
            return real_list(*args, **kwargs)

        def counted_inspect(*args: Any, **kwargs: Any) -> Any:
            self.inspects += 1
            return real_inspect(*args, **kwargs)

        client.api.containers = counted_list  # type: ignore[method-assign]
        client.api.inspect_container = counted_inspect  # type: ignore[method-assign]
        return client


def test_one_loop_cycle_lists_the_containers_once(stack: Stack) -> None:
    counter = CountingClients(stack.gate)
    b = ComposeBackend(stack.project, stack.app, client_factory=counter, stats_stale_after_s=3)
    # Two services (the bystander is not opted in: it reads 0) make three reads of the listing
    # per cycle: reconcile's and one replica count each. All hold, so nothing acts.
    policy = parse_policy(
        {
            "interval_s": 1.0,
            "services": {
                "worker": {"queues": ["work"], "min_replicas": 1, "max_replicas": 1},
                "bystander": {"queues": ["other"], "min_replicas": 0, "max_replicas": 1},
            },
        },
        env={},
    )
    reader = RedisQueueReader.from_url(stack.app.conf.broker_url)
    scaler = Scaler(PolicySource(policy), b, Collector(queues=reader))
    try:
        scaler.cycle()  # the first cycle also checks every worker's consumers (adoption)
        before = counter.lists
        for _ in range(3):
            report = scaler.cycle()
            assert report.errors == ()
            assert {s: o.replicas for s, o in report.observations.services.items()} == {
                "worker": 1,
                "bystander": 0,
            }
            assert {d.action for d in report.decisions.values()} == {"hold"}
        assert counter.lists - before == 3
    finally:
        b.close()
        reader.client.close()


def test_actions_never_use_the_cycles_listing_and_a_failed_one_holds_the_cycle(
    stack: Stack, proxy: SwitchableDockerProxy, proxied_gate: GateServer
) -> None:
    counter = CountingClients(proxied_gate)
    b = ComposeBackend(
        stack.project, stack.app, client_factory=counter, attempts=2, backoff_s=0.1,
        drain_timeout_s=60, stats_stale_after_s=3,
    )  # fmt: skip
    b.manage([SPEC])
    try:
        b.begin_cycle()
        assert b.replicas("worker") == 1
        listed = counter.lists
        assert b.replicas("worker") == 1 and [w.state for w in b.workers("worker")] == ["running"]
        assert counter.lists == listed  # the cycle's reads share one listing
        # A change behind the cycle's back: its reads keep their view, an action does not.
        stack.compose("up", "-d", "--wait", "--no-recreate", "--scale", "worker=2", "worker")
        assert b.replicas("worker") == 1
        result = b.scale("worker", 2)
        assert (result.before, result.started) == (2, ())  # it re-listed: nothing to start
        assert b.replicas("worker") == 2  # the action dropped the shared listing

        # A drain that ends mid-cycle drops the listing too: the stopped worker is not counted.
        b.begin_cycle()
        assert b.scale("worker", 1).after == 1
        assert b.replicas("worker") == 1  # shared listing taken while the drain runs
        poll_until(lambda: b.health().extra["draining"] == 0, "the drain to end", 60)
        assert b.replicas("worker") == 1
        assert len(stack.names("worker")) == 1

        # A failed listing fails the cycle's reads too, without asking the engine again.
        b.begin_cycle()
        proxy.down()
        with pytest.raises(BackendError, match="list containers"):
            b.reconcile()
        listed = counter.lists
        with pytest.raises(BackendError, match="list containers"):
            b.replicas("worker")
        assert counter.lists == listed
        proxy.up()
        b.begin_cycle()
        assert b.replicas("worker") == 1
    finally:
        b.close()


# -- a worker left consuming nothing by a drain cut short ------------------------------------------


def _queues(stack: Stack, node: str) -> list[str] | None:
    """The queues ``node`` consumes, as it says itself (None: no answer)."""
    replies = stack.app.control.inspect([node], timeout=1.0).active_queues() or {}
    return None if node not in replies else [q["name"] for q in replies[node]]


def test_adoption_gives_a_worker_without_consumers_its_queues_back(
    stack: Stack, backend: ComposeBackend
) -> None:
    one = f"{stack.project}-worker-1"
    node = _node(one)
    assert _queues(stack, node) == ["work"]
    # As if a scaler died between a drain's cancel and its stop: the worker runs, takes nothing.
    stack.app.control.cancel_consumer("work", destination=[node], reply=True)
    poll_until(lambda: _queues(stack, node) == [], "the cancel to take effect", 10)
    assert backend.replicas("worker") == 1  # the container list cannot tell

    events = backend.reconcile()  # this backend's first: it adopts the running workers

    assert [(e.service, e.kind) for e in events] == [("worker", "consumers-restored")], events
    assert node in events[0].detail
    poll_until(lambda: _queues(stack, node) == ["work"], "the worker consuming again", 10)
    assert backend.reconcile() == []  # checked every reconcile: consuming, left alone
    release = f"release-{uuid.uuid4().hex}"
    redis.Redis.from_url(stack.app.conf.broker_url).rpush(release, 1)
    task = stack.app.send_task("cst.hold", args=[release, 30], queue="work")
    hostname = docker.from_env().api.inspect_container(one)["Config"]["Hostname"]
    assert task.get(timeout=30) == hostname


def test_a_worker_losing_its_consumer_while_managed_is_healed_then_replaced(
    stack: Stack, backend: ComposeBackend
) -> None:
    """The standing check (not only adoption): a consumer lost behind the scaler's back (as a
    broker reconnect can) is re-added at the next reconcile; lost again before the check after,
    the container is drained, removed and cloned under its number."""
    one = f"{stack.project}-worker-1"
    node = _node(one)
    assert backend.reconcile() == []  # adoption: consuming, left alone
    stack.app.control.cancel_consumer("work", destination=[node], reply=True)
    poll_until(lambda: _queues(stack, node) == [], "the cancel to take effect", 10)

    events = backend.reconcile()
    assert [(e.service, e.kind) for e in events] == [("worker", "consumers-restored")], events
    poll_until(lambda: _queues(stack, node) == ["work"], "the worker consuming again", 10)

    stack.app.control.cancel_consumer("work", destination=[node], reply=True)
    poll_until(lambda: _queues(stack, node) == [], "the second cancel to take effect", 10)
    before = docker.from_env().api.inspect_container(one)["Id"]
    events = backend.reconcile()
    assert [(e.service, e.kind) for e in events] == [("worker", "consumer-less-replaced")], events
    assert backend.replicas("worker") == 0  # being replaced: not counted as capacity
    seen: list[Any] = []
    poll_until(lambda: _drained(backend, seen), "the replacement to finish", 90)
    assert [e.kind for e in seen] == ["replaced-unresponsive"], seen
    fresh = docker.from_env().api.inspect_container(one)
    assert fresh["Id"] != before
    poll_until(lambda: _queues(stack, _node(one)) == ["work"], "the clone consuming", 60)


# -- container resources off the critical path ----------------------------------------------------


def test_resources_come_from_streamed_samples(stack: Stack, backend: ComposeBackend) -> None:
    backend.replicas("worker")
    missing = backend.resources("worker")
    assert (missing.cpu_percent, missing.memory_percent) == (None, None)  # no reader yet

    backend.reconcile()
    poll_until(
        lambda: backend.resources("worker").cpu_percent is not None,
        "a CPU sample (needs two consecutive stats messages)",
        30,
    )
    sample = backend.resources("worker")
    assert sample.cpu_percent is not None and 0 <= sample.cpu_percent <= 100
    assert sample.memory_percent is not None and 0 < sample.memory_percent < 100


def test_worker_cpu_reads_in_percent_of_the_containers_cpu_limit(stack: Stack) -> None:
    """A container capped at 0.5 CPU burning a core is saturated: near 100 %, not a quarter of
    this 2-core host; an uncapped one reads as its share of the host."""
    counter = CountingClients(stack.gate)
    b = ComposeBackend(stack.project, stack.app, client_factory=counter, stats_stale_after_s=3)
    b.manage([ServiceSpec("burner-capped", ("cpu-capped",)), ServiceSpec("burner", ("cpu",))])
    try:
        stack.compose("up", "-d", "burner-capped", "burner")
        b.reconcile()  # starts a stats reader per container, with its CPU limit
        host_share = 100.0 / (os.cpu_count() or 1)  # one busy core, of all the host's

        # Read as a share of the host, the capped burner could never pass 0.5 / CPUs (25 % here):
        # 70 % leaves room for a busy machine starving it below its quota for a while.
        def capped() -> float | None:
            cpu = b.resources("burner-capped").cpu_percent
            return cpu if cpu is not None and cpu >= 70.0 else None

        # One busy thread, uncapped: at most one core's share of the host, never rescaled.
        def uncapped() -> float | None:
            cpu = b.resources("burner").cpu_percent
            return cpu if cpu is not None and 0.3 * host_share <= cpu else None

        assert poll_until(capped, "the capped burner near 100 % of its limit", 60) <= 110.0
        seen = poll_until(uncapped, f"the uncapped burner near {host_share:.0f} % of the host", 60)
        assert seen <= 1.15 * host_share
        # The limit is read once per container, when its reader starts, not every cycle.
        inspects = counter.inspects
        for _ in range(3):
            b.reconcile()
        assert counter.inspects == inspects
    finally:
        b.close()
        stack.compose("rm", "-f", "-s", "-v", "burner-capped", "burner", check=False)


def test_a_stopped_containers_stats_message_reads_as_missing() -> None:
    """The engine streams all-zero messages for a stopped container: missing, not 0%."""
    stopped = {
        "cpu_stats": {"cpu_usage": {"total_usage": 0}, "throttling_data": {}},
        "precpu_stats": {"cpu_usage": {"total_usage": 0}},
        "memory_stats": {},
    }
    r = resources_from_sample(stopped, None, 1.0)
    assert (r.cpu_percent, r.memory_percent) == (None, None)
    busy = {
        "cpu_stats": {
            "cpu_usage": {"total_usage": 1_500_000_000},
            "system_cpu_usage": 10_000_000_000,
            "online_cpus": 2,
        },
        "precpu_stats": {"cpu_usage": {"total_usage": 500_000_000}, "system_cpu_usage": 8e9},
        "memory_stats": {"usage": 300, "limit": 1000, "stats": {"total_inactive_file": 100}},
    }
    r = resources_from_sample(busy, None, 1.0)
    assert r.cpu_percent == pytest.approx(50.0)  # 1 s of CPU in 2 s of host time (2 CPUs)
    assert r.memory_percent == pytest.approx(20.0)  # page cache excluded
    limited = resources_from_sample(busy, 0.5, 1.0)
    assert limited.cpu_percent == pytest.approx(200.0)  # of its half-CPU quota


# -- what the backend refuses ---------------------------------------------------------------------


# -- templates that reach the host are never cloned ----------------------------------------------


def test_unsafe_templates_are_refused_naming_the_container_and_the_setting(
    worker_image: str,
) -> None:
    # A project of its own with only these two services: no broker needed (an in-memory one
    # answers the backend's worker checks with nobody).
    stack = Stack(
        f"cst-test-compose-{uuid.uuid4().hex[:8]}",
        {**os.environ, "CST_WORKER_IMAGE": worker_image},
        Celery("cst-test-unsafe", broker="memory://"),
    )
    unsafe = ("--profile", "unsafe")
    gates = contextlib.ExitStack()
    # The stack's gate allows no bind mount; a second one is given the fixture's directory.
    strict = gates.enter_context(project_gate(stack.project))
    lenient = gates.enter_context(project_gate(stack.project, allowed_bind_mounts=(str(FIXTURE),)))
    b = ComposeBackend(
        stack.project, stack.app, client_factory=strict.clients(), stats_stale_after_s=3,
        inspect_timeout_s=0.3,
    )  # fmt: skip
    b.manage([ServiceSpec("privileged", ("p",)), ServiceSpec("bound", ("b",))])
    try:
        stack.compose(*unsafe, "create", "privileged")
        stack.compose(*unsafe, "up", "-d", "bound")
        with pytest.raises(BackendError) as err:
            b.scale("privileged", 1)  # not even the service's own stopped container is started
        assert f"refusing to clone {stack.project}-privileged-1" in str(err.value)
        assert "HostConfig.Privileged is true" in str(err.value)
        (row,) = stack.ps("privileged", all_states=True)
        assert row["State"] == "created", row

        with pytest.raises(BackendError) as err:
            b.scale("bound", 2)
        assert f"{stack.project}-bound-1" in str(err.value)
        assert f"bind mount of host path {str(FIXTURE)!r}" in str(err.value)
        assert "clone.allowed_bind_mounts []" in str(err.value)
        assert stack.names("bound") == [f"{stack.project}-bound-1"]
        with pytest.raises(BackendError):
            b.scale("bound", 2)  # refused again, reported once
        refused = [e for e in b.reconcile() if e.kind == "clone-refused"]
        assert sorted(e.service for e in refused) == ["bound", "privileged"], refused

        # Listed in the policy but not in the gate's GATE_ALLOWED_BIND_MOUNTS: the gate refuses
        # the clone (403), reported the same way, naming the container and the setting.
        b.manage([ServiceSpec("bound", ("b",), allowed_bind_mounts=(str(FIXTURE),))])
        with pytest.raises(BackendError) as err:
            b.scale("bound", 2)
        assert f"refusing to clone {stack.project}-bound-1" in str(err.value)
        assert f"bind mount of host path {str(FIXTURE)!r}" in str(err.value)
        (event,) = [e for e in b.reconcile() if e.kind == "clone-refused"]
        assert event.service == "bound" and str(FIXTURE) in event.detail, event
        assert stack.names("bound") == [f"{stack.project}-bound-1"]

        # Listed in both, the same bind mount is cloned.
        b.close()
        b = ComposeBackend(
            stack.project, stack.app, client_factory=lenient.clients(), stats_stale_after_s=3,
            inspect_timeout_s=0.3,
        )  # fmt: skip
        b.manage([ServiceSpec("bound", ("b",), allowed_bind_mounts=(str(FIXTURE),))])
        assert b.scale("bound", 2).after == 2
        assert len(stack.names("bound")) == 2
    finally:
        b.close()
        gates.close()
        stack.compose(*unsafe, "down", "-v", "-t", "0", "--remove-orphans", check=False)
        stack.app.close()


def test_bad_input_and_unmanaged_services_are_refused(
    stack: Stack, backend: ComposeBackend
) -> None:
    with pytest.raises(ValueError, match="project='Bad Name'"):
        ComposeBackend("Bad Name", stack.app)
    with pytest.raises(ValueError, match="replicas=-1"):
        backend.scale("worker", -1)
    with pytest.raises(BackendError, match="'bystander' is not managed"):
        backend.scale("bystander", 3)
    # Named by a policy but not opted in with the label: nothing to clone, nothing touched.
    backend.manage([SPEC, ServiceSpec("bystander", ("other",))])
    assert backend.replicas("bystander") == 0
    with pytest.raises(BackendError, match=r"autoscale\.managed=true"):
        backend.scale("bystander", 2)
    assert len(stack.names("bystander")) == 1


def test_worker_node_names_follow_celery_rules() -> None:
    def inspected(cmd: list[str], hostname: str = "abc123") -> dict[str, Any]:
        return {"Id": "abc123" + "0" * 58, "Config": {"Hostname": hostname, "Cmd": cmd}}

    assert worker_node_name(inspected(["celery", "-A", "x", "worker"])) == "celery@abc123"
    assert worker_node_name(inspected(["celery", "worker", "-n", "io@%h"])) == "io@abc123"
    assert worker_node_name(inspected(["celery", "worker", "--hostname=cpu"])) == "celery@cpu"
    shell = ["sh", "-c", "exec celery -A app worker -n default@$HOSTNAME -Q default"]
    assert worker_node_name(inspected(shell)) == "default@abc123"
    died = ComposeContainer("i", "n", "worker", 2, "exited", 137)
    parked = ComposeContainer("i", "n", "worker", 1, "exited", 0)
    assert died.died and not parked.died and not parked.live


# -- a dead worker's messages back, a live one's never (issue 18, defect 1) ------------------------


def _owner_restorer(stack: Stack) -> tuple[UnackedRestorer, redis.Redis]:
    """A restorer on the project's broker, which the fixture's workers record owners on."""
    stack.app.conf.broker_transport_options = {"unacked_owner_key": "unacked_owner"}
    restorer = UnackedRestorer.for_app(stack.app)
    assert restorer is not None
    return restorer, redis.Redis.from_url(stack.app.conf.broker_url)


def test_a_worker_killed_before_its_name_was_confirmed_has_its_task_back_at_once(
    stack: Stack,
) -> None:
    """A replica killed while busy, before the backend ever confirmed its worker's name (the
    start script names it ``work@<hostname>``, not what the command line suggests): its message
    goes back by the dead container's hostname, and its replacement runs the task (it used to
    wait for the one-hour visibility timeout, owned by a name nobody restored)."""
    restorer, client = _owner_restorer(stack)
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), drain_timeout_s=60,
        restorer=restorer,
    )  # fmt: skip
    b.manage([SPEC])
    one = f"{stack.project}-worker-1"
    release = f"release-{uuid.uuid4().hex}"
    try:
        task = stack.app.send_task("cst.hold", args=[release, 120], queue="work")
        owners = poll_until(restorer.owners, "the worker to hold the task", 30)
        assert owners == {_node(one): 1}
        docker.from_env().api.kill(one)  # SIGKILL: no warm shutdown, nothing acked
        poll_until(lambda: b.workers("worker")[0].state == "dead", "the container to die", 30)

        events = b.reconcile()  # restores by the container's hostname, then replaces it

        restored = [e for e in events if e.kind == RESTORED]
        assert [e.count for e in restored] == [1], events
        assert restorer.owners() == {}
        client.rpush(release, "go")
        assert task.get(timeout=60) != one  # run by the replacement
    finally:
        b.close()
        restorer.close()
        client.close()


@pytest.mark.parametrize("stack", [{"CST_WORKER_POOL": "solo"}], indirect=True)
def test_the_start_sweep_never_takes_the_task_of_a_live_worker_that_cannot_answer(
    stack: Stack,
) -> None:
    """A ``solo`` worker running a task cannot answer a ping. A scaler that starts (or takes
    over) then sweeps the owners of unacked messages: this worker's container runs, so its task
    stays where it is, whatever the ping says (it used to be put back and run a second time)."""
    restorer, client = _owner_restorer(stack)
    policy = parse_policy(
        {"services": {"worker": {"queues": ["work"], "min_replicas": 1, "max_replicas": 1}}},
        env={},
    )
    b = ComposeBackend(
        stack.project, stack.app, client_factory=stack.clients(), drain_timeout_s=60,
        restorer=restorer,
    )  # fmt: skip
    reader = RedisQueueReader.from_url(stack.app.conf.broker_url)
    scaler = Scaler(PolicySource(policy), b, Collector(queues=reader), restorer=restorer)
    release = f"release-{uuid.uuid4().hex}"
    try:
        task = stack.app.send_task("cst.hold", args=[release, 120], queue="work")
        (node,) = poll_until(restorer.owners, "the worker to hold the task", 30)
        assert not stack.app.control.ping([node], timeout=1.0), "a busy solo worker answered"

        report = scaler.cycle()  # a start: the sweep runs

        assert not any("restored" in e for e in scaler.events), scaler.events
        assert restorer.owners() == {node: 1}
        assert client.llen("work") == 0, "the live worker's task was put back on its queue"
        assert report.observations.services["worker"].replicas == 1
        client.rpush(release, "go")
        task.get(timeout=60)
        poll_until(lambda: not restorer.owners(), "the ack", 10)
    finally:
        b.close()
        reader.client.close()
        restorer.close()
        client.close()
