"""Two whole scalers on one policy and one Redis: only the leader acts; a standby takes over.

Two `scaler run` processes (local backend, real Celery workers, the session's Redis and
PostgreSQL) share the policy, the lease and the workers' directory, as two scaler replicas share
the Docker engine in the stack. The leader is killed with SIGKILL (a crash: no lease release),
and the standby must take the lease within two lease periods, adopt the workers the dead leader
started, and act: here, draining the burst's extra workers back to the minimum.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import yaml
from scaler_runs import ScalerRun, start_scaler_run, stop_workers, worker_pids
from scaler_support import effects, local_policy, migrate, service_app, worker_env
from support.polling import poll_until

from scaler.control import ControlStore

pytestmark = pytest.mark.slow

LEASE_S = 2.0
BURST = 40

# One step up per second: the standby, seeing the same backlog, wants more than the workers it
# sees for several cycles (and must not act on it).
POLICY = yaml.safe_dump(
    local_policy(
        {"io": ["io_intensive"]},
        up={"stabilization_s": 0, "cooldown_s": 1, "max_step": 1},
        down={"stabilization_s": 2, "cooldown_s": 0.5, "max_step": 3},
    )
)


@pytest.fixture
def env(redis_url: str, database_url: str, key_prefix: str) -> Iterator[dict[str, str]]:
    migrate(database_url)
    prefix = f"{key_prefix}ha{uuid.uuid4().hex[:6]}:"
    yield {
        **worker_env(redis_url, database_url, prefix),
        "SCALER_KEY_PREFIX": prefix,
        "SCALER_LEASE_S": str(LEASE_S),
    }
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Any]:
    app = service_app(env)
    yield app
    app.close()


@pytest.fixture
def scalers(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[list[ScalerRun], Path]]:
    """Started by the test (so it picks the order); every scaler and worker ended afterwards."""
    runs: list[ScalerRun] = []
    workdir = tmp_path / "workers"
    try:
        yield runs, workdir
    finally:
        for run in runs:
            run.stop(signal.SIGKILL if run.proc.poll() is None else signal.SIGTERM)
        stop_workers(workdir)


def owner(run: ScalerRun) -> str | None:
    lease = (run.state() or {}).get("leader") or {}
    value = lease.get("owner")
    return str(value) if value else None


def test_only_the_leader_acts_and_the_standby_takes_over_when_it_dies(
    scalers: tuple[list[ScalerRun], Path],
    tmp_path: Path,
    env: dict[str, str],
    app: Any,
    redis_url: str,
    database_url: str,
) -> None:
    runs, workdir = scalers
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    a = start_scaler_run("a", policy, workdir, tmp_path, env)
    runs.append(a)
    poll_until(
        lambda: a.service("io").get("current") == 1 and (a.state() or {}).get("role") == "leader",
        "scaler a to lead and start io's minimum",
    )
    b = start_scaler_run("b", policy, workdir, tmp_path, env)
    runs.append(b)
    poll_until(
        lambda: (b.state() or {}).get("role") == "standby" and b.service("io").get("current") == 1,
        "scaler b to stand by and see a's worker",
    )
    assert (b.state() or {})["leader"]["holder"] == owner(a)

    # Both serve metrics that parse and a live /status; only one leads; both know the desired
    # count.
    for run, leading in ((a, 1.0), (b, 0.0)):
        samples = run.metrics()
        assert samples[("scaler_leader", ())] == leading, run.name
        assert samples[("scaler_replicas_desired", (("service", "io"),))] == 1, run.name
        code, status = run.get_json("/status")
        assert code == 200 and status["role"] == ("leader" if leading else "standby")
        assert run.get_json("/healthz")[0] == 200, "a standby that cycles is healthy"

    ids = [
        app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.4}).id for _ in range(BURST)
    ]
    poll_until(lambda: len(worker_pids(workdir)) >= 2, "the leader to scale io up", timeout_s=20)
    poll_until(
        lambda: any(d["action"] == "up" for d in b.decisions("io")),
        "the standby to want the same scale-up",
        timeout_s=10,
    )
    before_kill = b.decisions("io")
    assert any(d["action"] == "up" and d["acted"] for d in a.decisions("io"))

    a.proc.send_signal(signal.SIGKILL)  # a crash: the lease is not released
    killed_at = time.time()
    lease_key = f"{env['SCALER_KEY_PREFIX']}leader:scaler"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    b_owner = owner(b)
    poll_until(
        lambda: client.get(lease_key) == b_owner,
        "the standby to take the lease within two lease periods",
        timeout_s=2 * LEASE_S,
        every_s=0.05,
    )
    poll_until(lambda: (b.state() or {}).get("role") == "leader", "b's status to say leader")

    # The standby never acted while it was one; it had wanted to.
    assert before_kill and all(not d["acted"] for d in before_kill)
    assert all(d["note"] == "standby: not the leader" for d in before_kill if d["action"] != "hold")
    assert all(not d["acted"] for d in b.decisions("io") if d["ts"] < killed_at)

    done = poll_until(
        lambda: len(effects(database_url, ids)) == BURST and effects(database_url, ids),
        "the whole burst to finish on the dead leader's workers",
        timeout_s=90,
    )
    assert set(done.values()) == {1}  # every task exactly once, none lost in the takeover

    # The new leader acts: after the down window it drains io back to its minimum.
    poll_until(
        lambda: any(d["action"] == "down" and d["acted"] for d in b.decisions("io")),
        "the new leader to scale io down",
        timeout_s=30,
    )
    poll_until(lambda: len(worker_pids(workdir)) == 1, "io back at one worker", timeout_s=40)
    assert b.stop() == 0
    assert client.get(lease_key) is None, "a clean stop releases the lease"
    client.close()


def busy_nodes(app: Any) -> set[str]:
    """Workers running a task right now."""
    return {node for node, tasks in (app.control.inspect(timeout=1.0).active() or {}).items()
            if tasks}  # fmt: skip


def test_a_frozen_leader_loses_the_lease_and_acts_no_more_when_it_resumes(
    scalers: tuple[list[ScalerRun], Path],
    tmp_path: Path,
    env: dict[str, str],
    app: Any,
    redis_url: str,
    database_url: str,
) -> None:
    """The leader is frozen (SIGSTOP) while it drains two busy workers; the standby takes the
    lease and adopts them; when the old leader resumes, its drain threads wake up and must not
    signal or start any worker: every step is fenced by the lease it began under."""
    runs, workdir = scalers
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    a = start_scaler_run("a", policy, workdir, tmp_path, env)
    runs.append(a)
    poll_until(lambda: (a.state() or {}).get("role") == "leader", "scaler a to lead")
    b = start_scaler_run("b", policy, workdir, tmp_path, env)
    runs.append(b)
    poll_until(lambda: (b.state() or {}).get("role") == "standby", "scaler b to stand by")
    store = ControlStore.from_url(redis_url, lambda: {"io": 3}, prefix=env["SCALER_KEY_PREFIX"])
    store.pin("io", 3, by="test")
    poll_until(lambda: len(worker_pids(workdir)) == 3, "a to start three workers", timeout_s=20)
    ids = [app.send_task("tasks.io_intensive.wait", kwargs={"duration": 4.0}).id for _ in range(6)]
    poll_until(lambda: len(busy_nodes(app)) == 3, "all three workers busy", timeout_s=20)
    store.pin("io", 1, by="test")
    poll_until(
        lambda: any(d["action"] == "down" and d["acted"] for d in a.decisions("io")),
        "a to begin draining two busy workers",
    )
    a.proc.send_signal(signal.SIGSTOP)  # mid-drain: its threads wait for the workers to idle
    frozen_at = time.monotonic()
    lease_key = f"{env['SCALER_KEY_PREFIX']}leader:scaler"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    b_owner = owner(b)
    poll_until(lambda: client.get(lease_key) == b_owner, "b to take the lease", every_s=0.05)
    assert time.monotonic() - frozen_at < 2 * LEASE_S, "takeover within two lease periods"
    poll_until(lambda: (b.state() or {}).get("role") == "leader", "b's status to say leader")

    resumed_at = time.time()
    a.proc.send_signal(signal.SIGCONT)

    def refused() -> int:
        lease = (a.state() or {}).get("leader") or {}
        return int(lease.get("refused_actions") or 0)

    poll_until(refused, "a's woken drain threads to be refused by their fence", timeout_s=20)
    poll_until(lambda: (a.state() or {}).get("role") == "standby", "a to stand by")
    done = poll_until(
        lambda: len(effects(database_url, ids)) == len(ids) and effects(database_url, ids),
        "every task done",
        timeout_s=60,
    )
    assert set(done.values()) == {1}
    poll_until(lambda: len(worker_pids(workdir)) == 1, "b to drain io to the pinned 1", 40)

    # After it resumed, a started no worker and signalled none: its log says so, and no live
    # worker is a child of a started since.
    after = [e for e in a.logs() if e.get("ts", 0) >= resumed_at]
    acted = [
        e["msg"]
        for e in after
        if str(e.get("msg", "")).startswith(("started worker", "worker ", "replacing"))
    ]
    assert not acted, f"a acted after it resumed: {acted}"
    assert any("refused" in str(e.get("msg", "")) for e in after), after[-5:]
    for pid in worker_pids(workdir):
        proc = psutil.Process(pid)
        assert not (proc.ppid() == a.proc.pid and proc.create_time() >= resumed_at), pid
    generation = ((b.state() or {}).get("leader") or {}).get("generation")
    assert generation is not None and generation >= 2, b.state()
    store.unpin("io")
    client.close()
