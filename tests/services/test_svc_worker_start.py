"""The worker as the image starts it: compose/scripts/start-worker.sh, its flags (no mingle, no
gossip) and services.worker instead of the `celery` umbrella command. What the scaler and the warm
pool need from a worker must still hold: it answers ping and inspect, consumes its queue, takes
cancel_consumer/add_consumer, and exits 0 on a warm shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
from celery.utils.nodenames import host_format

ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = ROOT / "compose" / "scripts" / "start-worker.sh"


def test_the_shipped_start_script_gives_a_worker_that_answers_and_consumes(
    redis_env: Any, start_worker: Any, poll: Any
) -> None:
    queue = f"start-{uuid.uuid4().hex[:6]}"  # a node name no other test's worker has
    node = host_format(f"{queue}@%h")  # start-worker.sh names the worker QUEUE@%h
    # `python` on PATH is this venv's, as /opt/venv/bin is first on the image's PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    worker = start_worker(
        redis_env,
        [],
        command=["bash", str(START_SCRIPT)],
        extra_env={"WORKER_QUEUE": queue, "WORKER_CONCURRENCY": "1", "PATH": path},
    )
    cmdline = " ".join(psutil.Process(worker.proc.pid).cmdline())
    assert "-m services.worker" in cmdline and "celery worker" not in cmdline, cmdline
    app = redis_env.app()

    pong = poll(lambda: app.control.ping([node], timeout=1.0), f"{node} answering ping", 20)
    assert pong == [{node: {"ok": "pong"}}]
    queues = app.control.inspect([node], timeout=5.0).active_queues()
    assert [q["name"] for q in queues[node]] == [queue]
    result = app.send_task("tasks.default.record", kwargs={"key": "k"}, queue=queue).get(30)
    assert result["worker"] == node and result["key"] == "k"

    # The scaler drains with cancel_consumer; the warm pool resumes with add_consumer.
    cancelled = app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=5.0)
    assert "ok" in cancelled[0][node], cancelled
    poll(  # confirmed, and applied by the worker's consumer (its event loop) right after
        lambda: app.control.inspect([node], timeout=5.0).active_queues()[node] == [],
        f"{node} consuming nothing after cancel_consumer",
        20,
    )
    added = app.control.add_consumer(queue, destination=[node], reply=True, timeout=5.0)
    assert "ok" in added[0][node], added
    again = app.send_task("tasks.default.record", kwargs={"key": "k2"}, queue=queue).get(30)
    assert again["worker"] == node

    # Started without mingle: no "searching for neighbors" wait (1 s) before consuming.
    assert "mingle" not in worker.log()
    assert worker.terminate() == 0, worker.log()


def test_the_worker_entry_point_refuses_to_detach() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.worker", "-Q", "x", "--detach"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 64
    assert "--detach is not supported" in proc.stderr
