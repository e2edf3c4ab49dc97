"""A stop that outlives its leadership never reaches its irreversible step (issue 18).

A drained worker is stopped with a grace period: the stop signal, then a kill if it is still
running at the end. The kill (and the container's removal) must come only after a fresh fence
check: a lease lost during the grace period, and taken over by another scaler, must leave the
worker to the new leader. Real processes (local backend) and real containers (Compose backend,
through an engine gate for the container's project as in the stack), a real lease in Redis
(released to revoke the fence).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from celery import Celery
from support.polling import poll_until

from scaler.backends.compose import ComposeBackend, ComposeContainer
from scaler.backends.local import LocalBackend, LocalWorker
from scaler.fencing import LeadershipLost
from scaler.leader import LeaderLease
from tests.gate.gate_support import GateServer, project_gate

# A process that notes each SIGTERM and goes on running: only a kill ends it.
STUBBORN = (
    "import pathlib, signal, sys, time\n"
    "note = pathlib.Path(sys.argv[1])\n"
    "signal.signal(signal.SIGTERM, lambda *_: note.write_text('term'))\n"
    "note.write_text('ready')\n"
    "while True: time.sleep(0.1)\n"
)


@pytest.fixture
def lease(redis_url: str, key_prefix: str) -> Iterator[LeaderLease]:
    """A lease this replica holds (long: it never lapses by itself during a test)."""
    lease = LeaderLease.from_url(
        redis_url, name=f"fenced-stop-{uuid.uuid4().hex[:8]}", prefix=key_prefix, lease_s=60
    )
    assert lease.step()
    yield lease
    lease.release()


def test_local_stop_fenced_during_the_grace_period_never_kills(
    tmp_path: Path, lease: LeaderLease
) -> None:
    """The worker ignores SIGTERM; the lease is released while the stop waits out the grace
    period. The wait ends at the next fence check (not at the grace period's end), and the
    worker is never sent SIGKILL: it is still running afterwards."""
    grace_s = 30.0
    note = tmp_path / "note"
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, str(note)])
    backend = LocalBackend(app=Celery("fenced-stop", set_as_current=False), workdir=tmp_path,
                           grace_s=grace_s)  # fmt: skip
    worker = LocalWorker("io", 1, "io-1@test", proc.pid, tmp_path / "io-1.pid", popen=proc)
    outcome: list[Any] = []

    def stop() -> None:
        try:
            outcome.append(backend._stop(worker, lease.fence(), answers=False))
        except Exception as exc:
            outcome.append(exc)

    try:
        poll_until(lambda: note.exists() and note.read_text() == "ready", "the worker to run")
        thread = threading.Thread(target=stop, daemon=True)
        thread.start()
        poll_until(lambda: note.read_text() == "term", "the stop's SIGTERM", every_s=0.01)
        revoked_at = time.monotonic()
        lease.release()  # leadership lost mid-grace (another scaler may take over now)
        thread.join(timeout=grace_s / 3)
        took = time.monotonic() - revoked_at
        assert not thread.is_alive(), f"the stop still waits {took:.1f} s after the lease went"
        print(f"local stop: fenced {took:.3f} s after the lease was released (grace {grace_s} s)")
        assert outcome and isinstance(outcome[0], LeadershipLost), outcome
        assert proc.poll() is None, "the worker was killed after its stop lost its fence"
        assert lease.state().refused_actions >= 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


# -- the Compose backend: a real container, stopped through the engine ---------------------------


def _docker() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception:
        return None


IMAGE = "local/debian-base:bookworm"  # any image with sh; pulled only if missing


@pytest.fixture
def engine() -> Iterator[docker.DockerClient]:
    client = _docker()
    if client is None:
        pytest.skip("needs a Docker engine")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"needs the image {IMAGE}")
    yield client
    client.close()


@pytest.fixture
def project() -> str:
    return f"cst-test-fenced-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gate(project: str) -> Iterator[GateServer]:
    with project_gate(project) as server:
        yield server


@pytest.fixture
def stubborn_container(engine: docker.DockerClient, project: str) -> Iterator[tuple[str, float]]:
    """A managed container of ``project`` that notes SIGTERM in its log and goes on running;
    4 s grace period."""
    grace_s = 4
    script = 'trap "echo got-term" TERM; echo ready; while :; do sleep 0.1; done'
    created = engine.api.create_container(
        IMAGE,
        ["sh", "-c", script],
        name=f"cst-test-fenced-stop-{uuid.uuid4().hex[:8]}",
        stop_timeout=grace_s,
        labels={
            "cst-test": "fenced-stop",
            "autoscale.managed": "true",
            "com.docker.compose.project": project,
            "com.docker.compose.service": "worker",
            "com.docker.compose.container-number": "1",
        },
    )
    cid = created["Id"]
    try:
        engine.api.start(cid)
        poll_until(lambda: b"ready" in engine.api.logs(cid), "the container to run")
        yield cid, float(grace_s)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.api.remove_container(cid, force=True)


def _drain_in_thread(backend: ComposeBackend, cid: str, lease: LeaderLease) -> threading.Thread:
    container = ComposeContainer(cid, cid[:12], "worker", 1, "running", None)
    thread = threading.Thread(
        target=backend._drain,
        args=("worker", container, "work@test", False, lease.fence()),
        kwargs={"answers": False},  # no Celery here: straight to the stop
        daemon=True,
    )
    thread.start()
    return thread


@pytest.mark.docker
def test_compose_stop_fenced_during_the_grace_period_neither_kills_nor_removes(
    engine: docker.DockerClient,
    stubborn_container: tuple[str, float],
    lease: LeaderLease,
    project: str,
    gate: GateServer,
) -> None:
    """The engine's own `docker stop` would SIGKILL at the end of the grace period whoever
    leads by then, and the removal follows. Here the lease goes during the grace period: the
    container keeps running past it, and is still there."""
    cid, grace_s = stubborn_container
    app = Celery("fenced-stop", set_as_current=False)
    backend = ComposeBackend(project, app, client_factory=gate.clients())
    try:
        thread = _drain_in_thread(backend, cid, lease)
        poll_until(lambda: b"got-term" in engine.api.logs(cid), "the stop signal", every_s=0.02)
        signalled_at = time.monotonic()
        lease.release()  # leadership lost mid-grace
        thread.join(timeout=grace_s + 10)
        assert not thread.is_alive()
        print(f"compose stop: fenced {time.monotonic() - signalled_at:.3f} s after the signal")
        # Past the grace period (with margin), the container still runs: no kill was pending
        # (waiting out a span here is the point: nothing may happen in it).
        poll_until(lambda: time.monotonic() - signalled_at > grace_s * 1.5, "the grace to pass")
        state = engine.api.inspect_container(cid)["State"]
        assert state["Running"], f"killed after the stop lost its fence: {state}"
        assert lease.state().refused_actions >= 1
    finally:
        backend.close()


@pytest.mark.docker
def test_compose_stop_with_its_fence_valid_kills_past_the_grace_and_removes(
    engine: docker.DockerClient,
    stubborn_container: tuple[str, float],
    lease: LeaderLease,
    project: str,
    gate: GateServer,
) -> None:
    """The same stop while the lease holds: the stop signal, the grace period, then the kill
    and the removal, as `docker stop` and `docker rm` would do."""
    cid, grace_s = stubborn_container
    app = Celery("fenced-stop", set_as_current=False)
    backend = ComposeBackend(project, app, client_factory=gate.clients())
    try:
        started = time.monotonic()
        thread = _drain_in_thread(backend, cid, lease)
        thread.join(timeout=grace_s + 30)
        took = time.monotonic() - started
        assert not thread.is_alive()
        assert not _exists(engine, cid), "the stopped container was not removed"
        print(f"compose stop: killed and removed after {took:.2f} s (grace {grace_s} s)")
        assert took >= grace_s * 0.9, "killed before its grace period ended"
        assert lease.state().refused_actions == 0
    finally:
        backend.close()


def _exists(engine: docker.DockerClient, cid: str) -> bool:
    try:
        engine.api.inspect_container(cid)
    except docker.errors.NotFound:
        return False
    return True
