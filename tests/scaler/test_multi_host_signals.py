"""A backend that spans several machines gives the host guard its own reading (Swarm: the node
with the most room), and the Swarm backend refuses bad arguments by name before any call.

The collector reads a real Redis; the multi-machine backend is the real local backend with a
``host_resources`` added (fault injection of the nodes' figures: a swarm of real nodes is what
tests/swarm runs, too heavy for this rule's cases), and says so.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from celery import Celery

from scaler.backends.base import BackendError, ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.backends.swarm import SwarmBackend, SwarmTask
from scaler.observations import Resources
from scaler.signals.collector import Collector, queue_reader_for_app


class NodesBackend(LocalBackend):
    """The local backend plus the nodes' reading a multi-host backend provides."""

    reading: Resources | Exception | None = None

    def host_resources(self) -> Resources | None:
        if isinstance(self.reading, Exception):
            raise self.reading
        return self.reading


def _collector_and_backend(tmp_path: Path, redis_url: str) -> tuple[Collector, NodesBackend]:
    app = Celery("mh-test", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"mh{uuid.uuid4().hex[:6]}:"}
    backend = NodesBackend(app=app, workdir=tmp_path / "workers")
    backend.manage([ServiceSpec("io", ("io_intensive",))])
    return Collector(queue_reader_for_app(app)), backend


def test_the_host_guard_reads_the_backends_nodes_when_it_has_them(
    tmp_path: Path, redis_url: str
) -> None:
    collector, backend = _collector_and_backend(tmp_path, redis_url)
    backend.reading = Resources(12.5, 40.0, read_at=1.0)
    obs = collector.collect({"io": ["io_intensive"]}, backend)
    assert (obs.host.cpu_percent, obs.host.memory_percent) == (12.5, 40.0)
    assert not obs.errors

    backend.reading = None  # no node reported yet: this machine's own reading
    obs = collector.collect({"io": ["io_intensive"]}, backend)
    assert obs.host.memory_percent is not None and obs.host.read_at > 1.0

    backend.reading = BackendError("manager unreachable")
    obs = collector.collect({"io": ["io_intensive"]}, backend)
    assert any("node resources unreadable: manager unreachable" in e for e in obs.errors)
    assert obs.host.memory_percent is not None  # still this machine's, never made up


def test_swarm_backend_names_what_is_wrong_with_its_arguments() -> None:
    app = Celery("swarm-args", set_as_current=False)
    with pytest.raises(ValueError, match="stack=''"):
        SwarmBackend("", app)
    with pytest.raises(ValueError, match="exit_timeout_s=0"):
        SwarmBackend("celery", app, exit_timeout_s=0)
    backend = SwarmBackend("celery", app)
    backend.manage([ServiceSpec("worker-io", ("io_intensive",))])
    with pytest.raises(ValueError, match="replicas=-1 for service 'worker-io'"):
        backend.scale("worker-io", -1)
    with pytest.raises(BackendError, match="'worker-x' is not managed here"):
        backend.replicas("worker-x")


def test_a_swarm_task_reads_its_state_and_its_worker_host() -> None:
    row = {
        "ID": "t1", "Slot": 3, "NodeID": "n1", "DesiredState": "running",
        "Status": {"State": "complete", "Message": "finished",
                   "ContainerStatus": {"ContainerID": "0123456789abcdef", "ExitCode": 0}},
    }  # fmt: skip
    task = SwarmTask.from_api(row)
    assert task.host == "0123456789ab" and task.exit_code == 0 and task.slot == 3
    assert task.runnable and not task.live  # its slot still counts until Swarm marks it
    starting = SwarmTask.from_api({"ID": "t2", "DesiredState": "running",
                                   "Status": {"State": "pending"}})  # fmt: skip
    assert starting.live and starting.host == "" and starting.exit_code is None
