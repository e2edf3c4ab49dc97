"""Swarm on three nodes against Compose on one host: reaction, burst drain and cycle cost.

One run starts the three-manager Docker-in-Docker swarm of the Swarm tests (tests/swarm/cluster.py:
a registry, the application image pushed once and pulled on every node) with Redis and PostgreSQL
beside it (tests/swarm/backing.py). **Swarm side**: worker-io as a Swarm service made the way
`docker stack deploy` makes compose/stack.yaml's, driven by scaler.backends.swarm.SwarmBackend over
the first manager's API. **Compose side**: the same worker-io from the same image in a Compose
project on the host engine (bench/fixtures/swarm_compose_side.compose.yaml), on the cluster's
network, driven by scaler.backends.compose.ComposeBackend. Both sides use the same Redis server
and PostgreSQL (each side its own Redis databases, so neither consumes the other's burst); worker-io
runs 4 threads per replica (as benchmark 1) and each side's scaler is the real loop
(scaler.loop.Scaler) running in this process with the same policy: worker-io's rules of
compose/scaler-policy.yaml polled every 2 s (no arrival events: the Swarm side has none), benchmark
1's 4 s scale-down window, the host guard at 100 % (never binding).

Each trial starts from worker-io at its minimum (one replica answering, a fresh scaler whose first
cycle has run, then a random phase of the 2 s cycle) and publishes benchmark 1's burst: 120
`tasks.io_intensive.wait` of 3 s. **Reaction** is publish (the first message sent) to the first
task started on a replica that did not answer before the burst (its effect row in PostgreSQL,
stamped when the task began; on Swarm the worker's host is the new task's container short id, on
Compose the new container's). The same trial goes on to **burst drain**: burst fully enqueued to
the last effect, and **replica-seconds**, the side's running worker-io containers (read from the
engine every 0.5 s, apart from the backend) integrated over the drain. Trials alternate Swarm and
Compose (the order swapped every round), so a change in the machine's load hits both.

**Cycle cost**: five worker services (one per queue of the stack, threads pool, concurrency 1) on
the swarm, 6 then 20 replicas each (30 then 100 worker tasks spread over the three nodes), and
benchmark 3's measurement (bench/scaler_cost.py's timed wrappers, a policy whose min and max equal
the counts so every cycle holds): per cycle the wall time and CPU time of
`Scaler.cycle()` (begin_cycle, reconcile, the replica and resource reads, the hold decisions,
the status), and the CPU the three nodes' engines spent. The steps keep benchmark 3's names: on
Swarm "reconcile" is the manager's service and task listing plus the workers' resource reports
(Celery's control API), "container list (replicas)" the per-service reads of that listing and
"stats read" the per-service mean of the reports. The Compose figures it is set against are
benchmark 3's last result (5/15/30 containers, idle solo workers, its own run), stated as such.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import docker
import psutil
import psycopg2
import yaml

from bench.compose_project import ComposeProject
from bench.context import Context
from bench.gate import compose_gate
from bench.polling import BenchTimeout, poll_until
from bench.reaction import reaction_policy
from bench.result import Result
from bench.scaler_cost import (
    STEPS,
    TimedBackend,
    TimedHostStats,
    TimedQueueReader,
    _cpu_s,
    _quiet_decision_log,
    _summarise,
)
from bench.stats import ratio, summary
from bench.step_timer import StepTimer
from scaler.backends.base import Backend, ServiceSpec
from scaler.backends.compose import ComposeBackend
from scaler.backends.swarm import SwarmBackend
from scaler.decide import decide
from scaler.loop import PolicySource, Scaler
from scaler.policy import Policy, parse_policy
from scaler.signals.collector import Collector
from scaler.signals.redis_queues import RedisQueueReader
from scaler.signals.resources import HostStats
from scaler.status import write_snapshot
from services.application import ServiceApp, create_app
from services.config import PRIORITY_SEP, PRIORITY_STEPS, load_settings

_TESTS = Path(__file__).resolve().parents[1] / "tests"
for _dir in (_TESTS, *(_TESTS / sub for sub in ("swarm", "e2e", "chaos"))):  # support: tests/
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

from backing import Backing, create_worker_service, start_backing, wait_answering  # noqa: E402
from cluster import ENGINE_PORT, NODES, SwarmCluster  # noqa: E402

NAME = "swarm"
TITLE = "Swarm on three nodes against Compose on one host (issue 13)"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "swarm_compose_side.compose.yaml"
SERVICE = "worker-io"
QUEUE = "io_intensive"
TASK = "tasks.io_intensive.wait"
CONCURRENCY = 4
TASKS = 120
TASK_S = 3.0
TRIALS = 5
TRIAL_DEADLINE_S = 180.0
SAMPLE_S = 0.5
SIDES = ("swarm", "compose")
# Redis databases: broker and results per side, and the cycle-cost workers' own.
DBS = {"swarm": (0, 1), "compose": (2, 3), "cost": (4, 5)}
COST_SERVICES = {
    "worker-default": "default",
    "worker-cpu": "cpu_intensive",
    "worker-io": "io_intensive",
    "worker-priority": "priority",
    "worker-scheduled": "scheduled",
}
COST_LEVELS = (30, 100)
COST_CYCLES, COST_WARMUP = 20, 3
PACE_S = 0.25
MEMORY_RESERVE_GIB = 4.0  # what the 100-worker level leaves free, at least


# -- the two sides ----------------------------------------------------------------------------


@dataclass
class Side:
    """One deployment under test: its Celery client, its backend and an independent count."""

    name: str
    app: ServiceApp
    broker_url: str
    backend: Backend
    count: Callable[[], int]  # running worker-io containers, read from the engine directly


def _app(backing: Backing, dbs: tuple[int, int], main: str) -> ServiceApp:
    broker, results = (f"redis://{backing.redis_ip}:6379/{db}" for db in dbs)
    settings = load_settings(
        {
            "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": results,
            "DATABASE_URL": backing.database_url,
        }
    )
    app = create_app(settings, main=main)
    backing.apps.append(app)
    return app


def _worker_env(backing: Backing, dbs: tuple[int, int], queue: str, c: int) -> dict[str, str]:
    env = backing.worker_env(queue, "threads", c)
    env["CELERY_BROKER_URL"] = f"redis://{backing.redis_ip}:6379/{dbs[0]}"
    env["CELERY_RESULT_BACKEND"] = f"redis://{backing.redis_ip}:6379/{dbs[1]}"
    return env


def _swarm_factory(cluster: SwarmCluster) -> Callable[[], docker.DockerClient]:
    url = f"tcp://{cluster.node_ip(NODES[0])}:{ENGINE_PORT}"
    return lambda: docker.DockerClient(base_url=url, timeout=60)


def _swarm_running(client: docker.DockerClient, service: str) -> int:
    tasks = client.api.tasks(filters={"service": service, "desired-state": "running"})
    return sum(1 for t in tasks if (t.get("Status") or {}).get("State") == "running")


def _compose_running(client: docker.DockerClient, project: str) -> int:
    labels = [f"com.docker.compose.project={project}", f"com.docker.compose.service={SERVICE}"]
    return len(client.containers.list(filters={"label": labels, "status": "running"}))


def side_policy(root: Path) -> Policy:
    """Benchmark 1's "cold + polling 2 s" policy, worker-io's rules only (the one managed)."""
    text, _ = reaction_policy(root, "cold-polling")
    raw: dict[str, Any] = yaml.safe_load(text)
    raw["services"] = {SERVICE: raw["services"][SERVICE]}
    return parse_policy(raw, env={})


# -- one trial: reaction and drain of the same burst ------------------------------------------


def _effects(database_url: str, prefix: str) -> list[tuple[str, str, float, float]]:
    """(task id, worker hostname, start, end) of the burst's effects (as bench.stack_project)."""
    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT task_id, hostname,"
                " extract(epoch FROM created_at) - coalesce((payload->>'waited_s')::float, 0),"
                " extract(epoch FROM created_at) FROM task_effects WHERE task_id LIKE %s",
                (prefix + "%",),
            )
            return [(str(a), str(b), float(c), float(d)) for a, b, c, d in cur.fetchall()]
    finally:
        conn.close()


def _integrate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Replica-seconds of a step function sampled as (time, count) between start and end."""
    total = 0.0
    for (t0, n), (t1, _) in zip(samples, [*samples[1:], (end, 0)], strict=True):
        lo, hi = max(t0, start), min(t1, end)
        if hi > lo:
            total += n * (hi - lo)
    return total


def to_minimum(side: Side, deadline_s: float = 240) -> set[str]:
    """worker-io back at one replica that answers; the hosts answering (no scaler running)."""

    def one() -> list[str] | None:
        side.backend.begin_cycle()
        side.backend.reconcile()
        if side.backend.replicas(SERVICE) > 1:
            side.backend.scale(SERVICE, 1)
            return None
        if side.count() != 1:
            return None
        nodes = sorted(n for r in side.app.control.ping(timeout=1.0) or [] for n in r)
        return nodes if len(nodes) == 1 else None

    nodes = poll_until(one, f"{side.name}: {SERVICE} at one answering replica", deadline_s, 0.5)
    return {n.split("@", 1)[1] for n in nodes}


def _start_scaler(side: Side, policy: Policy) -> tuple[Scaler, threading.Event, threading.Thread]:
    reader = RedisQueueReader.from_url(
        side.broker_url, sep=PRIORITY_SEP, steps=tuple(PRIORITY_STEPS)
    )
    scaler = Scaler(PolicySource(policy), side.backend, Collector(queues=reader, host=HostStats()))
    stop = threading.Event()
    thread = threading.Thread(
        target=scaler.run, args=(stop,), name=f"scaler-{side.name}", daemon=True
    )
    thread.start()
    return scaler, stop, thread


def trial(
    ctx: Context, side: Side, policy: Policy, database_url: str, index: int
) -> dict[str, Any]:
    """One burst from the minimum: reaction, drain time, replica-seconds (or why not)."""
    before = to_minimum(side)
    scaler, stop, thread = _start_scaler(side, policy)
    try:
        poll_until(lambda: scaler.cycles >= 1, f"{side.name}: the scaler's first cycle", 60)
        # Real backlogs arrive at any phase of the cycle.
        time.sleep(random.Random(f"{side.name}-{index}").uniform(0.0, policy.interval_s))
        prefix = f"swb-{side.name}-{uuid.uuid4().hex[:6]}-{index}-"
        samples: list[tuple[float, int]] = [(time.time(), side.count())]
        published = time.time()
        with side.app.producer_or_acquire() as producer:
            for i in range(TASKS):
                side.app.send_task(
                    TASK,
                    kwargs={"duration": TASK_S, "key": f"{prefix}{i}"},
                    task_id=f"{prefix}{i:03d}",
                    producer=producer,
                )
        enqueued = time.time()
        first_new: float | None = None
        rows: list[tuple[str, str, float, float]] = []
        deadline = time.monotonic() + TRIAL_DEADLINE_S
        while time.monotonic() < deadline:
            samples.append((time.time(), side.count()))
            rows = _effects(database_url, prefix)
            new = [start for _, host, start, _ in rows if host.split("@", 1)[-1] not in before]
            if new and first_new is None:
                first_new = min(new)
            if len(rows) >= TASKS:
                break
            time.sleep(SAMPLE_S)  # the sampling period of the replica count, not a wait
    finally:
        stop.set()
        thread.join(timeout=300)
    out: dict[str, Any] = {
        "side": side.name,
        "publish_s": enqueued - published,
        "done": len(rows),
        "peak_replicas": max(n for _, n in samples),
    }
    if first_new is not None:
        out["reaction_s"] = first_new - published
    if len(rows) >= TASKS:
        last = max(end for *_, end in rows)
        out["drain_s"] = last - enqueued
        out["replica_s"] = _integrate(samples, enqueued, last)
    ctx.log(
        f"swarm: {side.name} trial {index}: "
        + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())
    )
    return out


# -- cycle cost on the swarm ------------------------------------------------------------------


def _node_engines(cluster: SwarmCluster) -> list[psutil.Process]:
    """The three nodes' dockerd processes (host processes: the nodes share the host's kernel)."""
    marks = [f"--cgroup-parent=/{cluster.cgroup_parent(n)}" for n in NODES]
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if proc.info.get("name") == "dockerd" and any(m in cmd for m in marks):
            found.append(proc)
    return found


def _engines_cpu(procs: list[psutil.Process]) -> float:
    return sum(_cpu_s(p) for p in procs)


def cost_level(
    ctx: Context, cluster: SwarmCluster, backing: Backing, stack: str, per_service: int
) -> dict[str, Any]:
    """Time hold cycles of the real loop against the swarm's five services at their counts."""
    app = _app(backing, DBS["cost"], "swarm-bench-cost")
    live = {}
    client = cluster.manager_client()
    try:
        for svc in COST_SERVICES:
            live[svc] = _swarm_running(client, f"{stack}_{svc}")
    finally:
        client.close()
    containers = sum(live.values())
    timer = StepTimer()
    backend = SwarmBackend(stack, app, client_factory=_swarm_factory(cluster), poll_s=0.2)
    timed = cast(Backend, TimedBackend(cast(ComposeBackend, backend), timer))
    policy = parse_policy(
        {
            "interval_s": 2.0,
            "host": {"cpu_percent": 100, "memory_percent": 100},
            "services": {
                svc: {"queues": [q], "min_replicas": live[svc], "max_replicas": live[svc]}
                for svc, q in COST_SERVICES.items()
            },
        },
        env={},
    )
    url = f"redis://{backing.redis_ip}:6379/{DBS['cost'][0]}"
    reader = RedisQueueReader.from_url(url, sep=PRIORITY_SEP, steps=tuple(PRIORITY_STEPS))
    collector = Collector(queues=TimedQueueReader(reader, timer), host=TimedHostStats(timer=timer))
    state = Path(tempfile.mkdtemp(prefix="cst-bench-state-")) / "state.json"
    scaler = Scaler(PolicySource(policy), timed, collector, state_file=state)
    engines = _node_engines(cluster)
    rows: list[dict[str, Any]] = []
    anomalies: list[str] = []
    try:
        scaler.cycle()  # names the workers, asks them for their resources
        for i in range(COST_WARMUP + COST_CYCLES):
            history = scaler.history
            timer.take()
            d0, p0, t0 = _engines_cpu(engines), time.process_time(), time.thread_time()
            w0 = time.perf_counter()
            report = scaler.cycle()
            wall = time.perf_counter() - w0
            proc_cpu, thread_cpu = time.process_time() - p0, time.thread_time() - t0
            engine_cpu = _engines_cpu(engines) - d0
            steps = timer.take()
            obs = report.observations
            started = time.perf_counter()
            decide(policy, obs, history, obs.at)
            steps["decide (replayed)"] = time.perf_counter() - started
            if scaler.last_snapshot is not None:
                started = time.perf_counter()
                write_snapshot(state, scaler.last_snapshot)
                steps["status write (replayed)"] = time.perf_counter() - started
            steps["rest (loop, history, logging)"] = max(0.0, wall - sum(steps.values()))
            actions = {d.action for d in report.decisions.values()}
            if report.errors or actions != {"hold"}:
                anomalies.append(f"cycle {i}: actions {sorted(actions)}, errors {report.errors}")
            if i >= COST_WARMUP:
                rows.append(
                    {
                        "wall_s": wall,
                        "process_cpu_s": proc_cpu,
                        "thread_cpu_s": thread_cpu,
                        "dockerd_cpu_s": engine_cpu,
                        "steps": steps,
                    }
                )
            time.sleep(PACE_S)  # benchmark 3's pace between cycles
        p0, d0 = time.process_time(), _engines_cpu(engines)
        time.sleep(3.0)  # benchmark 3's idle window: background CPU with no cycle running
        background = {
            "scaler_cpu_percent": (time.process_time() - p0) / 3.0 * 100,
            "dockerd_cpu_percent": (_engines_cpu(engines) - d0) / 3.0 * 100,
        }
    finally:
        backend.close()
        reader.client.close()
    ctx.log(f"swarm: cost at {containers} worker tasks measured ({len(anomalies)} anomalies)")
    return {
        "containers": containers,
        "per_service": live,
        "cycles": rows,
        "background": background,
        "anomalies": anomalies,
    }


def _available_gib() -> float:
    return float(psutil.virtual_memory().available) / 2**30


def measure_cost(
    ctx: Context, cluster: SwarmCluster, backing: Backing, image: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Both levels (or what fits in memory), each with its answering workers; notes."""
    notes: list[str] = []
    stack = f"swcost{uuid.uuid4().hex[:6]}"
    client = cluster.manager_client()
    app = _app(backing, DBS["cost"], "swarm-bench-cost-ping")
    levels: list[dict[str, Any]] = []
    services = []
    try:
        free_before = _available_gib()
        for svc, queue in COST_SERVICES.items():
            services.append(
                create_worker_service(
                    client,
                    stack=stack,
                    name=svc,
                    image=image,
                    env=_worker_env(backing, DBS["cost"], queue, 1),
                    replicas=0,
                )
            )
        previous = 0
        for level in COST_LEVELS:
            per = level // len(COST_SERVICES)
            if previous:
                per_worker = max(0.01, (free_before - _available_gib()) / previous)
                fits = int((_available_gib() - MEMORY_RESERVE_GIB) / per_worker) + previous
                if fits < level:
                    per = max(1, fits // len(COST_SERVICES))
                    notes.append(
                        f"{level} worker tasks do not fit in memory ({per_worker * 1024:.0f}"
                        f" MiB each measured at {previous}): measured {per * 5}."
                    )
            t0 = time.monotonic()
            for service in services:
                service.reload()  # its spec version moved with the previous level's scale
                service.scale(per)
            want = per * len(COST_SERVICES)
            try:
                wait_answering(app, want, deadline_s=420)
            except Exception as exc:  # measure what came up, and say so
                notes.append(f"{want} worker tasks wanted, not all answered in 420 s ({exc}).")
            ctx.log(
                f"swarm: {want} cost workers up in {time.monotonic() - t0:.0f} s, "
                f"{_available_gib():.1f} GiB available"
            )
            try:
                levels.append(cost_level(ctx, cluster, backing, stack, per))
            except Exception as exc:  # keep the levels measured so far
                notes.append(f"{want} worker tasks: cycle cost not measured ({exc!r}).")
                break
            levels[-1]["startup_s"] = time.monotonic() - t0
            levels[-1]["available_gib"] = _available_gib()
            previous = levels[-1]["containers"]
    finally:
        for service in services:
            with contextlib.suppress(docker.errors.APIError):
                service.remove()
        client.close()
    return levels, notes


# -- the run ----------------------------------------------------------------------------------


def _compose_reference(ctx: Context) -> dict[str, Any] | None:
    """Benchmark 3's last figures: its saved result, else its published table."""
    path = ctx.results_dir / "scaler_cost.json"
    if path.exists():
        saved = Result.load(path)
        when = time.strftime("%Y-%m-%d", time.gmtime(saved.started_at))
        return {
            "source": f"bench/results/scaler_cost.json (run {when})",
            "levels": [
                {
                    "containers": lv["containers"],
                    "wall_ms": lv["ms"]["wall_s"]["median"],
                    "cpu_ms": lv["ms"]["process_cpu_s"]["median"],
                }
                for lv in saved.summary["levels"]
            ],
        }
    try:
        text = ctx.report_path.read_text()
    except OSError:
        return None
    section = text.split("## Scaler cost per cycle (benchmark 3)", 1)
    if len(section) < 2:
        return None
    body = section[1].split("\n## ", 1)[0]
    levels = [
        {"containers": int(m[1]), "wall_ms": float(m[2]), "cpu_ms": float(m[3])}
        for m in re.finditer(
            r"^\| (\d+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", body, re.M
        )
    ]
    run = re.search(r"^Run (.+?), took", body, re.M)
    when = run.group(1) if run else "date unknown"
    return (
        {"source": f"docs/benchmarks.md, benchmark 3 as published (run {when})", "levels": levels}
        if levels
        else None
    )


def run(ctx: Context) -> Result:
    # tests/swarm/conftest.py by its path: tests/e2e and tests/chaos have a conftest too.
    spec = importlib.util.spec_from_file_location("swarm_conftest", _TESTS / "swarm/conftest.py")
    assert spec is not None and spec.loader is not None
    swarm_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(swarm_conftest)
    build_app_image, images_of = swarm_conftest.build_app_image, swarm_conftest.images_of

    started, t0 = time.time(), time.monotonic()
    _quiet_decision_log()
    trials = 2 if ctx.quick else TRIALS
    setup: dict[str, float] = {}
    policy = side_policy(ctx.root)
    rows: list[dict[str, Any]] = []
    cost: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cst-bench-swarm-") as tmp:
        local_image = build_app_image(Path(tmp))
    setup["app_image_build_s"] = time.monotonic() - t0
    with SwarmCluster() as cluster:
        setup["cluster_start_s"] = time.monotonic() - t0 - setup["app_image_build_s"]
        t1 = time.monotonic()
        images = images_of(cluster, local_image)
        cluster.pull(images.app, NODES)
        setup["push_pull_s"] = time.monotonic() - t1
        backing = start_backing(cluster)
        manager = cluster.manager_client()
        host = docker.from_env(timeout=60)
        project = ComposeProject(
            ctx.name("swarm-compose"),
            FIXTURE,
            {
                "CST_BENCH_APP_IMAGE": local_image,
                "CST_BENCH_NETWORK": cluster.network,
                "CST_BENCH_BROKER_URL": f"redis://{backing.redis_ip}:6379/{DBS['compose'][0]}",
                "CST_BENCH_RESULT_URL": f"redis://{backing.redis_ip}:6379/{DBS['compose'][1]}",
                "CST_BENCH_DATABASE_URL": backing.database_url,
            },
        )
        sides: dict[str, Side] = {}
        gates = contextlib.ExitStack()
        try:
            stack = f"swb{uuid.uuid4().hex[:6]}"
            create_worker_service(
                manager,
                stack=stack,
                name=SERVICE,
                image=images.app,
                env=_worker_env(backing, DBS["swarm"], QUEUE, CONCURRENCY),
                replicas=1,
            )
            swarm_app = _app(backing, DBS["swarm"], "swarm-bench-swarm")
            swarm_backend = SwarmBackend(
                stack, swarm_app, client_factory=_swarm_factory(cluster), poll_s=0.2
            )
            swarm_backend.manage([ServiceSpec(SERVICE, (QUEUE,))])
            sides["swarm"] = Side(
                "swarm",
                swarm_app,
                f"redis://{backing.redis_ip}:6379/0",
                swarm_backend,
                partial(_swarm_running, manager, f"{stack}_{SERVICE}"),
            )
            project.up({SERVICE: 1})
            compose_app = _app(backing, DBS["compose"], "swarm-bench-compose")
            # Through the engine gate, as the Compose stack runs it (docs/gate.md).
            clients = gates.enter_context(compose_gate(project.project))
            compose_backend = ComposeBackend(project.project, compose_app, client_factory=clients)
            compose_backend.manage([ServiceSpec(SERVICE, (QUEUE,))])
            sides["compose"] = Side(
                "compose",
                compose_app,
                f"redis://{backing.redis_ip}:6379/{DBS['compose'][0]}",
                compose_backend,
                partial(_compose_running, host, project.project),
            )
            setup["total_setup_s"] = time.monotonic() - t0
            ctx.log(f"swarm: setup {setup}")
            for i in range(trials):
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                for name in order:
                    try:
                        rows.append(trial(ctx, sides[name], policy, backing.database_url, i))
                    except BenchTimeout as exc:
                        rows.append({"side": name, "error": str(exc)})
                        ctx.log(f"swarm: {name} trial {i} failed: {exc}")
            for side in sides.values():
                side.backend.close()
            project.down()
            manager.services.get(f"{stack}_{SERVICE}").remove()
            t2 = time.monotonic()
            try:
                cost, cost_notes = measure_cost(ctx, cluster, backing, images.app)
                notes += cost_notes
            except Exception as exc:  # the side-by-side figures above stand without it
                ctx.log(f"swarm: cycle cost failed: {exc!r}")
                notes.append(f"Cycle cost not measured: {exc}")
            setup["cost_phase_s"] = time.monotonic() - t2
        finally:
            for side in sides.values():
                side.backend.close()
            gates.close()
            project.down()
            manager.close()
            host.close()
            backing.close()
    result = Result(
        name=NAME,
        title=TITLE,
        started_at=started,
        duration_s=time.monotonic() - t0,
        settings={
            "trials per side": trials,
            "burst": f"{TASKS} x {TASK} of {TASK_S} s, one connection",
            "service": f"{SERVICE}: threads, {CONCURRENCY} per replica, min 1, max "
            f"{policy.services[SERVICE].max_replicas}",
            "policy": "compose/scaler-policy.yaml worker-io rules, 2 s polling, no events, "
            "scale-down window 4 s, host guard 100 %",
            "swarm": "3 Docker-in-Docker managers on this host; backend on node-1's API",
            "compose": "the host engine, Compose project on the cluster's network",
            "order": "alternating Swarm and Compose, swapped each round",
            "cost workers": "5 services, threads pool, concurrency 1",
            "cost cycles per level": f"{COST_CYCLES} (+{COST_WARMUP} warm-up)",
        },
        samples={"trials": rows, "cost": cost, "setup": setup},
        summary=summarise(rows, cost, _compose_reference(ctx)),
    )
    result.notes = notes + fact_notes(result)
    return result


def summarise(
    rows: list[dict[str, Any]], cost: list[dict[str, Any]], compose_ref: dict[str, Any] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"sides": {}, "ratios": {}, "compose_reference": compose_ref}
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        entry: dict[str, Any] = {
            "trials": len(mine),
            "failed": sum(1 for r in mine if "drain_s" not in r),
        }
        for key in ("reaction_s", "drain_s", "replica_s", "peak_replicas"):
            values = [float(r[key]) for r in mine if key in r]
            if values:
                entry[key] = summary(values)
        out["sides"][side] = entry
    sw, co = out["sides"]["swarm"], out["sides"]["compose"]
    for key in ("reaction_s", "drain_s", "replica_s"):
        if key in sw and key in co:
            out["ratios"][key] = ratio(sw[key]["median"], co[key]["median"])
    out["cost"] = [_summarise(level) for level in cost]
    return out


def _compare(ratio_: float, slower: str, faster: str, same: str) -> str:
    """The wording for a Swarm/Compose ratio: beyond +-15 % a difference, else the same."""
    if ratio_ > 1.15:
        return slower
    if ratio_ < 1 / 1.15:
        return faster
    return same


def what_this_says(result: Result) -> str:
    """The section's closing paragraph, worded from the run's own figures."""
    s = result.summary
    sw, co, r = s["sides"]["swarm"], s["sides"]["compose"], s["ratios"]
    out: list[str] = ["**What this says.**"]
    if r.get("reaction_s") is not None:
        swr, cor = sw["reaction_s"], co["reaction_s"]
        # Medians apart by more than 15 % still say nothing when each side's median lies within
        # the other side's trials: the machine's noise, not the orchestrator.
        overlap = swr["best"] <= cor["median"] <= swr["worst"] and (
            cor["best"] <= swr["median"] <= cor["worst"]
        )
        out.append(
            f"Reaction: {swr['median']:.2f} s on Swarm against {cor['median']:.2f} s on Compose "
            f"(medians, {r['reaction_s']:.2f}x; p95 {swr['p95']:.2f} s against "
            f"{cor['p95']:.2f} s; trials {swr['best']:.2f}-{swr['worst']:.2f} s against "
            f"{cor['best']:.2f}-{cor['worst']:.2f} s). "
            + (
                "The two sides' trials overlap widely (each median lies within the other side's "
                "range): with this many trials on a loaded machine the run cannot tell them "
                "apart. "
                if overlap and abs(r["reaction_s"] - 1) > 0.15
                else ""
            )
            + _compare(
                1.0 if overlap else r["reaction_s"],
                "Swarm adds capacity later: a new task goes through the manager (scheduler, "
                "dispatcher), the node's agent and a container start inside a Docker-in-Docker "
                "engine on the same two cores, where the Compose backend creates and starts the "
                "container itself.",
                "Swarm added capacity sooner here than Compose did.",
                "Within this run's noise both add capacity as fast: what the orchestrator adds "
                "to a worker's start is below what the machine's load moves it by.",
            )
        )
    if r.get("drain_s") is not None and r.get("replica_s") is not None:
        out.append(
            f"Burst drain: {sw['drain_s']['median']:.1f} s against {co['drain_s']['median']:.1f} "
            f"s ({r['drain_s']:.2f}x), replica-seconds {sw['replica_s']['median']:.0f} against "
            f"{co['replica_s']['median']:.0f} ({r['replica_s']:.2f}x), peak "
            f"{sw['peak_replicas']['median']:.0f} and {co['peak_replicas']['median']:.0f} "
            "replicas. "
            + _compare(
                r["drain_s"],
                "The drain is longer on Swarm by more than the later first capacity alone.",
                "The drain was shorter on Swarm.",
                f"Once the replicas run, a drain of {TASK_S:g} s tasks is paced by their count, "
                "which is the same on both: the orchestrator costs at most the seconds of its "
                "reaction.",
            )
        )
    if s["cost"]:
        first, last = s["cost"][0], s["cost"][-1]
        walls = ", ".join(
            f"{lv['ms']['wall_s']['median']:.1f} ms wall and "
            f"{lv['ms']['process_cpu_s']['median']:.1f} ms scaler CPU at {lv['containers']}"
            for lv in s["cost"]
        )
        line = f"Cycle cost on Swarm: {walls} worker tasks"
        grow = ratio(last["ms"]["wall_s"]["median"], first["ms"]["wall_s"]["median"])
        if len(s["cost"]) > 1 and grow is not None:
            times = last["containers"] / first["containers"]
            flat = ": no measurable growth in this run" if grow < 1.15 else ""
            line += f" ({grow:.2f}x the wall time for {times:.1f}x the tasks{flat})"
        step = max(STEPS, key=lambda st: last["steps_median_ms"][st])
        line += (
            f"; at {last['containers']} the largest part is '{step}' "
            f"({last['steps_median_ms'][step]:.1f} ms)."
        )
        ref = s.get("compose_reference")
        at30 = next((lv for lv in (ref or {}).get("levels", []) if lv["containers"] == 30), None)
        if ref and at30 and first["containers"] == 30:
            line += (
                f" Compose at 30 containers ({ref['source']}: another run on another day, not "
                f"side by side) took {at30['wall_ms']:.1f} ms wall and {at30['cpu_ms']:.1f} ms "
                f"CPU: Swarm at 30 took {first['ms']['wall_s']['median'] / at30['wall_ms']:.1f}x "
                "that wall time (the machine's load differs between the runs: an indication, "
                "not a measured ratio)."
            )
        out.append(line)
    return " ".join(out)


def fact_notes(result: Result) -> list[str]:
    """Trials that did not finish and cycles that were not a clean hold."""
    s, out = result.summary, []
    for side in SIDES:
        if s["sides"][side]["failed"]:
            out.append(
                f"{side}: {s['sides'][side]['failed']} of {s['sides'][side]['trials']} "
                "trials did not finish (left out of the figures)."
            )
    for lv in result.samples["cost"]:
        if lv["anomalies"]:
            out.append(f"{lv['containers']} tasks, not a clean hold: {lv['anomalies'][0]}")
    return out


# -- reporting --------------------------------------------------------------------------------


def render(result: Result) -> str:
    s = result.summary

    def cell(side: str, key: str, stat: str, digits: int = 2) -> str:
        entry = s["sides"][side].get(key)
        return f"{entry[stat]:.{digits}f}" if entry else "-"

    lines = [
        "| Side | Trials (failed) | Reaction median (s) | p95 | Drain median (s) | p95 "
        "| Replica-s median | Peak replicas (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        e = s["sides"][side]
        lines.append(
            f"| {side} | {e['trials']} ({e['failed']}) | {cell(side, 'reaction_s', 'median')} "
            f"| {cell(side, 'reaction_s', 'p95')} | {cell(side, 'drain_s', 'median', 1)} "
            f"| {cell(side, 'drain_s', 'p95', 1)} | {cell(side, 'replica_s', 'median', 0)} "
            f"| {cell(side, 'peak_replicas', 'median', 0)} |"
        )
    r = s["ratios"]

    def bold(key: str) -> str:
        return f"**{r[key]:.2f}**" if r.get(key) is not None else "-"

    lines.append(
        f"| **Swarm / Compose** | | {bold('reaction_s')} | | {bold('drain_s')} | "
        f"| {bold('replica_s')} | |"
    )
    if s["cost"]:
        lines += [
            "",
            "Scaler cycle cost on the swarm (hold cycles, medians; engine CPU: the three "
            "nodes' dockerd, mean per cycle):",
            "",
            "| Worker tasks | Wall median (ms) | p95 | Scaler CPU, process (ms) "
            "| Cycle thread CPU (ms) | Engines CPU / cycle (ms) | Workers up in (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lv, raw in zip(s["cost"], result.samples["cost"], strict=True):
            ms = lv["ms"]
            lines.append(
                f"| {lv['containers']} | {ms['wall_s']['median']:.1f} | "
                f"{ms['wall_s']['p95']:.1f} | {ms['process_cpu_s']['median']:.1f} | "
                f"{ms['thread_cpu_s']['median']:.1f} | {ms['dockerd_cpu_s']['mean']:.1f} "
                f"| {raw.get('startup_s', 0):.0f} |"
            )
        lines += [
            "",
            "| step (median ms) | "
            + " | ".join(f"{lv['containers']} tasks" for lv in s["cost"])
            + " |",
            "|---|" + "---:|" * len(s["cost"]),
        ]
        for step in STEPS:
            lines.append(
                f"| {step} | "
                + " | ".join(f"{lv['steps_median_ms'][step]:.2f}" for lv in s["cost"])
                + " |"
            )
        ref = s.get("compose_reference")
        if ref:
            lines += [
                "",
                f"Compose, for comparison ({ref['source']}; another run, idle solo "
                "workers, not side by side):",
                "",
                "| Containers | Wall median (ms) | Scaler CPU, process (ms) |",
                "|---:|---:|---:|",
            ]
            lines += [
                f"| {lv['containers']} | {lv['wall_ms']:.1f} | {lv['cpu_ms']:.1f} |"
                for lv in ref["levels"]
            ]
    lines += ["", what_this_says(result)]
    setup = result.samples.get("setup") or {}
    if setup:
        lines += [
            "",
            "Setup (s): "
            + ", ".join(
                f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f}" for k, v in setup.items()
            ),
        ]
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    """Reaction and drain per trial, Swarm beside Compose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.samples["trials"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in zip(
        axes,
        ("reaction_s", "drain_s"),
        ("publish to first task on added capacity (s)", "enqueued to last effect (s)"),
        strict=True,
    ):
        data = [[float(r[key]) for r in rows if r["side"] == side and key in r] for side in SIDES]
        if not all(data):
            continue
        ax.boxplot(data, showfliers=False, medianprops={"color": "black"})
        for i, values in enumerate(data, start=1):
            jitter = random.Random(i)
            ax.scatter(
                [i + jitter.uniform(-0.1, 0.1) for _ in values],
                values,
                s=12,
                alpha=0.7,
                color="tab:blue",
                zorder=3,
            )
        ax.set_xticks([1, 2], ["Swarm (3 nodes)", "Compose (1 host)"])
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle("Swarm against Compose, alternating trials of one run (dots: trials)", fontsize=9)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "swarm.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
