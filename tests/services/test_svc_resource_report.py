"""Workers report their own and their machine's CPU and memory (services.resource_report), and
the scaler's reader (scaler.signals.worker_resources) turns the replies into readings: the path
the Swarm backend takes, since one engine's stats API sees only its own node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from scaler.signals.worker_resources import WorkerResources
from services.resource_report import cpu_limit, memory_limit


def _write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text + "\n")


def test_cpu_limit_reads_cgroup_v2_and_v1_and_says_none_when_unlimited(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    _write(v2, "cpu.max", "150000 100000")
    assert cpu_limit(v2) == 1.5
    _write(v2, "cpu.max", "max 100000")
    assert cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    _write(v1, "cpu,cpuacct/cpu.cfs_quota_us", "50000")
    _write(v1, "cpu,cpuacct/cpu.cfs_period_us", "100000")
    assert cpu_limit(v1) == 0.5
    _write(v1, "cpu,cpuacct/cpu.cfs_quota_us", "-1")
    assert cpu_limit(v1) is None
    assert cpu_limit(tmp_path / "nothing") is None


def test_memory_limit_ignores_unlimited_and_above_the_machine(tmp_path: Path) -> None:
    _write(tmp_path, "memory.max", str(256 * 2**20))
    assert memory_limit(tmp_path) == 256 * 2**20
    _write(tmp_path, "memory.max", "max")
    assert memory_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    _write(v1, "memory/memory.limit_in_bytes", str(psutil.virtual_memory().total * 4))
    assert memory_limit(v1) is None


@pytest.mark.slow
def test_a_live_worker_answers_and_the_reader_keeps_fresh_readings(
    redis_env: Any, start_worker: Any, poll: Any
) -> None:
    worker = start_worker(redis_env, ["default"])
    app = redis_env.app()
    replies = app.control.ping(timeout=2.0) or []
    nodes = [n for reply in replies for n in reply if n.startswith(f"{worker.name}@")]
    assert len(nodes) == 1, replies
    node = nodes[0]
    now = [100.0]
    reader = WorkerResources(app, timeout_s=2.0, every_s=5.0, stale_after_s=20.0,
                             clock=lambda: now[0])  # fmt: skip
    reader.refresh({node: "machine-a", "nobody@nowhere": "machine-b"})
    reader.wait(10)
    first = reader.mean([node])
    # A process's first answer has no CPU interval behind it: missing, never a made-up zero.
    assert first.cpu_percent is None
    assert first.memory_percent is not None and 0 < first.memory_percent < 100
    assert reader.mean(["nobody@nowhere"]).memory_percent is None  # did not answer
    reader.refresh({node: "machine-a"})  # too soon (every_s): nothing asked
    reader.wait(10)
    assert reader.mean([node]).cpu_percent is None
    now[0] += 5.0
    reader.refresh({node: "machine-a"})
    reader.wait(10)
    second = reader.mean([node])
    assert second.cpu_percent is not None and second.cpu_percent >= 0
    machine = reader.roomiest_node()
    assert machine is not None and machine.cpu_percent is not None
    assert 0 < (machine.memory_percent or 0) <= 100
    assert set(reader.nodes()) == {"machine-a"}
    now[0] += 21.0  # past stale_after_s: the readings are missing, not kept forever
    assert reader.mean([node]).memory_percent is None
    assert reader.roomiest_node() is None
