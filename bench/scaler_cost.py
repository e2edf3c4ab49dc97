"""Benchmark 3: what one scaler cycle costs with 5 queues and 30 or 100 managed containers, with
the engine gate's snapshot, with the gate's listing, and without the gate.

The real loop (scaler.loop.Scaler.cycle) runs against the real Compose backend and real idle Celery
workers in a throwaway Compose project (cst-bench-cost-<run id>), with a policy whose min and max
equal the current counts, so every cycle observes, decides "hold" and acts on nothing. At each
level three **variants** of the backend's reads run one after the other on the same containers:
**gate, snapshot** (the backend reads the gate's ``GET /gate/v1/snapshot``, which the gate keeps
from the engine's events: the deployed path), **gate, listing** (the same gate, the backend told
not to read the snapshot: it lists and inspects through the gate, the code before the snapshot)
and **no gate, listing** (the backend on the engine's socket: the code before the gate). The two
gate variants share one gate (keeping its snapshot) and one backend, and alternate cycle by cycle
(the backend's snapshot reader set or unset before each cycle), so the machine's load hits both
alike; the no-gate variant runs after them with a backend of its own. Per cycle it
records the wall time, the CPU time of the whole scaler process (``time.process_time``, which
includes the background stats readers) and of the cycle's own thread, and the Docker engine's CPU
time (dockerd serves the container listings). The cycle's parts are timed through thin wrappers
around the queue reader, the backend and the host stats (the loop's code runs unchanged); the
decision and the status write are timed by replaying them on the cycle's own inputs right after.
The backend's read of the containers (the snapshot, or the listing) is timed too, within reconcile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import docker
import docker.errors
import psutil
from celery import Celery

from bench.compose_project import ComposeProject
from bench.context import Context
from bench.gate import compose_gate
from bench.polling import poll_until
from bench.result import Result
from bench.stats import median, ratio, summary
from bench.step_timer import StepTimer
from bench.worker_image import worker_image
from scaler.backends.base import (
    Backend,
    BackendEvent,
    BackendHealth,
    ScaleResult,
    ServiceSpec,
    WorkerInfo,
)
from scaler.backends.compose import ComposeBackend
from scaler.backends.engine import ClientFactory, default_client_factory, gate_call
from scaler.decide import decide
from scaler.fencing import UNFENCED, Fence
from scaler.loop import PolicySource, Scaler
from scaler.observations import QueueSignal, Resources
from scaler.policy import parse_policy
from scaler.signals.collector import Collector, QueueReader
from scaler.signals.redis_queues import RedisQueueReader
from scaler.signals.resources import HostStats
from scaler.status import write_snapshot
from services.config import PRIORITY_SEP, PRIORITY_STEPS

NAME = "scaler_cost"
TITLE = "Scaler cost per cycle (benchmark 3)"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "scaler_cost.compose.yaml"
SERVICES = {
    "worker-default": "default",
    "worker-cpu": "cpu_intensive",
    "worker-io": "io_intensive",
    "worker-priority": "priority",
    "worker-scheduled": "scheduled",
}
LEVELS = (30, 100)
PACE_S = 0.25  # between cycles: the engine and Redis are not hammered back to back
IDLE_WINDOW_S = 3.0  # background CPU of the stats readers, measured with no cycle running
VARIANTS = {
    "snapshot": "gate, snapshot",
    "listing": "gate, listing",
    "engine": "no gate, listing",
}
READ_STEP = "of which: the containers' read (snapshot or listing)"
# The goals for the snapshot variant's median cycle, by container count.
SNAPSHOT_GOALS_MS = {30: 15.0, 100: 30.0}
STEPS = (
    "queue signals",
    "reconcile (container list, stats readers)",
    "of which: the containers' read (snapshot or listing)",
    "container list (replicas)",
    "stats read",
    "host stats",
    "decide (replayed)",
    "status write (replayed)",
    "rest (loop, history, logging)",
)


# -- wrappers that time the cycle's parts ------------------------------------------------------


@dataclass
class TimedQueueReader:
    """The broker reader, timed as the "queue signals" step."""

    inner: QueueReader
    timer: StepTimer

    def read(self, queues: Sequence[str]) -> dict[str, QueueSignal]:
        return self.timer.call("queue signals", lambda: self.inner.read(queues))


@dataclass
class TimedHostStats(HostStats):
    """Host CPU and memory, timed as the "host stats" step."""

    timer: StepTimer = field(default_factory=StepTimer)

    def read(self) -> Resources:
        return self.timer.call("host stats", super().read)


class TimedBackend:
    """The Compose backend with its per-cycle calls timed; everything else passes through."""

    def __init__(self, inner: ComposeBackend, timer: StepTimer) -> None:
        self.inner = inner
        self.timer = timer
        self.name = inner.name

    def manage(self, specs: Sequence[ServiceSpec]) -> None:
        self.inner.manage(specs)

    def begin_cycle(self) -> None:
        self.inner.begin_cycle()

    def services(self) -> list[str]:
        return self.inner.services()

    def workers(self, service: str) -> list[WorkerInfo]:
        return self.inner.workers(service)

    def replicas(self, service: str) -> int:
        return self.timer.call("container list (replicas)", lambda: self.inner.replicas(service))

    def warm(self, service: str) -> int:
        return self.inner.warm(service)

    def scale(
        self, service: str, replicas: int, fence: Fence = UNFENCED, warm: int | None = None
    ) -> ScaleResult:
        return self.inner.scale(service, replicas, fence, warm)

    def reconcile(self, fence: Fence = UNFENCED) -> list[BackendEvent]:
        step = "reconcile (container list, stats readers)"
        return self.timer.call(step, lambda: self.inner.reconcile(fence))

    def resources(self, service: str) -> Resources:
        return self.timer.call("stats read", lambda: self.inner.resources(service))

    def health(self) -> BackendHealth:
        return self.inner.health()

    def close(self) -> None:
        self.inner.close()


# -- measuring -------------------------------------------------------------------------------


def _dockerd() -> psutil.Process | None:
    """The local Docker engine's process, to count the CPU it spends serving the scaler."""
    for proc in psutil.process_iter(["name"]):
        if proc.info.get("name") == "dockerd":
            return proc
    return None


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _quiet_decision_log() -> None:
    """The loop logs every decision as a JSON line at INFO, as the real scaler does: keep that
    formatting cost in the cycle, but write the lines to /dev/null."""
    for name in ("scaler.decisions", "scaler.loop"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler(open(os.devnull, "w")))  # noqa: SIM115


def _measure_level(
    ctx: Context, project: ComposeProject, per_service: int, cycles: int, warmup: int
) -> list[dict[str, Any]]:
    """Bring the project to ``per_service`` replicas each and time ``cycles`` hold cycles of
    each variant."""
    containers = per_service * len(SERVICES)
    ctx.log(f"scaler_cost: {containers} worker containers starting")
    project.up(dict.fromkeys(SERVICES, per_service))
    url = f"redis://127.0.0.1:{project.port('redis', 6379)}/0"
    app = Celery("cst-bench-scaler", broker=url)
    app.conf.update(accept_content=["json"], task_serializer="json")
    try:
        poll_until(
            lambda: len(app.control.ping(timeout=1.0) or []) >= containers,
            f"{containers} workers to answer a ping",
            timeout_s=300,
            every_s=0.5,
        )
        ctx.log(f"scaler_cost: {containers} containers, the gate's variants in turns")
        out = _measure_backend(project, app, url, ("snapshot", "listing"), per_service, cycles,
                               warmup)  # fmt: skip
        ctx.log(f"scaler_cost: {containers} containers, no gate")
        return out + _measure_backend(project, app, url, ("engine",), per_service, cycles, warmup)
    finally:
        app.close()


def _snapshot_served(clients: ClientFactory) -> bool:
    client = clients()
    try:
        gate_call(client, "GET", "/gate/v1/snapshot")
        return True
    except docker.errors.APIError:
        return False
    finally:
        client.close()


def _measure_backend(
    project: ComposeProject,
    app: Celery,
    url: str,
    variants: tuple[str, ...],
    per_service: int,
    cycles: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Time ``cycles`` hold cycles of each of ``variants``, in turns, on one backend (through a
    gate keeping its snapshot, or on the engine's socket for "engine")."""
    containers = per_service * len(SERVICES)
    timer = StepTimer()
    gate = contextlib.ExitStack()
    if variants == ("engine",):
        clients = default_client_factory(token="")  # the engine's socket, as before the gate
    else:
        clients = gate.enter_context(compose_gate(project.project, snapshot=True))
        poll_until(lambda: _snapshot_served(clients), "the gate's snapshot", timeout_s=60)
    backend = ComposeBackend(
        project.project,
        app,
        client_factory=clients,
        stats_stale_after_s=5.0,
        use_snapshot="snapshot" in variants,
    )
    reader_of_snapshots = backend.snapshots
    read = backend._list  # the containers' read, timed where reconcile (or a read) calls it
    backend._list = lambda: timer.call(READ_STEP, read)  # type: ignore[method-assign]
    timed: Backend = TimedBackend(backend, timer)
    policy = parse_policy(
        {
            "interval_s": 2.0,
            "services": {
                svc: {"queues": [q], "min_replicas": per_service, "max_replicas": per_service}
                for svc, q in SERVICES.items()
            },
        },
        env={},
    )
    reader = RedisQueueReader.from_url(url, sep=PRIORITY_SEP, steps=tuple(PRIORITY_STEPS))
    collector = Collector(queues=TimedQueueReader(reader, timer), host=TimedHostStats(timer=timer))
    state = Path(tempfile.mkdtemp(prefix="cst-bench-state-")) / "state.json"
    scaler = Scaler(PolicySource(policy), timed, collector, state_file=state)
    dockerd = _dockerd()
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    anomalies: dict[str, list[str]] = {v: [] for v in variants}
    try:
        scaler.cycle()  # starts one stats reader per container
        poll_until(
            lambda: all(backend.resources(s).cpu_percent is not None for s in SERVICES),
            "a stats sample from every container",
            timeout_s=60,
        )
        for i in range(len(variants) * (warmup + cycles)):
            variant = variants[i % len(variants)]
            backend.snapshots = reader_of_snapshots if variant == "snapshot" else None
            history = scaler.history
            timer.take()
            d0, p0, t0 = _cpu_s(dockerd), time.process_time(), time.thread_time()
            w0 = time.perf_counter()
            report = scaler.cycle()
            wall = time.perf_counter() - w0
            proc_cpu, thread_cpu = time.process_time() - p0, time.thread_time() - t0
            engine_cpu = _cpu_s(dockerd) - d0
            steps = timer.take()
            obs = report.observations
            steps["decide (replayed)"] = _seconds(partial(decide, policy, obs, history, obs.at))
            snapshot = scaler.last_snapshot
            if snapshot is not None:
                steps["status write (replayed)"] = _seconds(
                    partial(write_snapshot, state, snapshot)
                )
            counted = sum(v for k, v in steps.items() if k != READ_STEP)  # within reconcile
            steps["rest (loop, history, logging)"] = max(0.0, wall - counted)
            actions = {d.action for d in report.decisions.values()}
            if report.errors or actions != {"hold"}:
                anomalies[variant].append(
                    f"cycle {i}: actions {sorted(actions)}, errors {report.errors}"
                )
            if i >= len(variants) * warmup:
                rows[variant].append(
                    {
                        "wall_s": wall,
                        "process_cpu_s": proc_cpu,
                        "thread_cpu_s": thread_cpu,
                        "dockerd_cpu_s": engine_cpu,
                        "steps": steps,
                    }
                )
            time.sleep(PACE_S)
        p0, d0 = time.process_time(), _cpu_s(dockerd)
        time.sleep(IDLE_WINDOW_S)
        background = {
            "scaler_cpu_percent": (time.process_time() - p0) / IDLE_WINDOW_S * 100,
            "dockerd_cpu_percent": (_cpu_s(dockerd) - d0) / IDLE_WINDOW_S * 100,
        }
        if reader_of_snapshots is not None and reader_of_snapshots.fallbacks:
            anomalies["snapshot"].append(
                f"{reader_of_snapshots.fallbacks} reads fell back to listing "
                f"({reader_of_snapshots.reads} snapshots read)"
            )
    finally:
        backend.close()
        gate.close()
        reader.client.close()
    return [{"containers": containers, "variant": v, "cycles": rows[v], "background": background,
             "anomalies": anomalies[v]} for v in variants]  # fmt: skip


def _summarise(level: dict[str, Any]) -> dict[str, Any]:
    rows = level["cycles"]
    ms = {key: summary([r[key] * 1000 for r in rows]) for key in
          ("wall_s", "process_cpu_s", "thread_cpu_s", "dockerd_cpu_s")}  # fmt: skip
    # dockerd's CPU times tick in 10 ms steps: its mean per cycle says more than its median.
    ms["dockerd_cpu_s"]["mean"] = sum(r["dockerd_cpu_s"] for r in rows) * 1000 / len(rows)
    steps = {s: median([r["steps"].get(s, 0.0) * 1000 for r in rows]) for s in STEPS}
    return {"containers": level["containers"], "variant": level["variant"], "ms": ms,
            "steps_median_ms": steps, "background": level["background"],
            "anomalies": len(level["anomalies"])}  # fmt: skip


def _by(summaries: list[dict[str, Any]], containers: int, variant: str) -> dict[str, Any]:
    return next(s for s in summaries if s["containers"] == containers and s["variant"] == variant)


def run(ctx: Context) -> Result:
    """Measure every level in one Compose project (30, then 100 containers), each variant in
    turn on the same containers."""
    started, t0 = time.time(), time.monotonic()
    cycles, warmup = (8, 2) if ctx.quick else (20, 3)
    _quiet_decision_log()
    image = worker_image(ctx.python_image(), ctx.root)
    env = {"CST_BENCH_WORKER_IMAGE": image, "REDIS_IMAGE": ctx.redis_image()}
    levels: list[dict[str, Any]] = []
    with ComposeProject(ctx.name("cost"), FIXTURE, env) as project:
        for containers in LEVELS:
            levels += _measure_level(ctx, project, containers // len(SERVICES), cycles, warmup)
    summaries = [_summarise(level) for level in levels]
    notes = []
    for containers in LEVELS:
        walls = {v: _by(summaries, containers, v)["ms"]["wall_s"]["median"] for v in VARIANTS}
        goal = SNAPSHOT_GOALS_MS[containers]
        met = "met" if walls["snapshot"] <= goal else f"missed by {walls['snapshot'] - goal:.1f} ms"
        notes.append(
            f"{containers} containers: median cycle {walls['snapshot']:.1f} ms with the snapshot, "
            f"{walls['listing']:.1f} ms listing through the gate "
            f"({ratio(walls['snapshot'], walls['listing']) or 0:.2f}x), {walls['engine']:.1f} ms "
            f"listing without the gate ({ratio(walls['snapshot'], walls['engine']) or 0:.2f}x). "
            f"Goal with the snapshot <= {goal:.0f} ms: {met}."
        )
    for containers in LEVELS:
        reads = {v: _by(summaries, containers, v)["steps_median_ms"][READ_STEP] for v in VARIANTS}
        cpu = {v: _by(summaries, containers, v)["ms"]["dockerd_cpu_s"]["mean"] for v in VARIANTS}
        notes.append(
            f"{containers} containers, the containers' read alone (median, within reconcile): "
            f"{reads['snapshot']:.1f} ms from the snapshot, {reads['listing']:.1f} ms listing "
            f"through the gate, {reads['engine']:.1f} ms listing on the engine; dockerd's CPU "
            f"per cycle {cpu['snapshot']:.1f}, {cpu['listing']:.1f} and {cpu['engine']:.1f} ms. "
            "The rest of reconcile (the consumer check's broadcast to every worker, the stats "
            "readers' upkeep) is the same in every variant."
        )
    notes.append(
        "Taken on a shared 2-core machine (other work ran on it): absolute figures move with its "
        "load; the ratios between variants of one run say more (the two gate variants "
        "alternate cycle by cycle; the no-gate one runs after them). Re-run with `python -m "
        "bench scaler_cost` (PYTHON_IMAGE and REDIS_IMAGE naming local images where no "
        "registry is reachable)."
    )
    for level in levels:
        for line in level["anomalies"][:3]:
            notes.append(
                f"{level['containers']} containers, {VARIANTS[level['variant']]}, "
                f"not a clean hold: {line}"
            )
    return Result(
        name=NAME,
        title=TITLE,
        started_at=started,
        duration_s=time.monotonic() - t0,
        settings={
            "levels": list(LEVELS),
            "variants": [f"{k}: {v}" for k, v in VARIANTS.items()],
            "queues": list(SERVICES.values()),
            "cycles_per_level": cycles,
            "warmup_cycles": warmup,
            "pace_s": PACE_S,
            "worker": "idle Celery worker, solo pool, one per container",
            "backend": "scaler.backends.compose.ComposeBackend (real engine; gate in this process)",
            "queue_reader": "RedisQueueReader, 10 priority lists per queue (the project's layout)",
            "image": image,
        },
        samples={"levels": levels},
        summary={"levels": summaries, "goals_ms": SNAPSHOT_GOALS_MS},
        notes=notes,
    )


# -- reporting -------------------------------------------------------------------------------


def render(result: Result) -> str:
    """The Markdown section: cycle cost per level and variant, and its breakdown."""
    s = result.summary
    lines = [
        "| containers | variant | wall median (ms) | wall p95 | wall worst | CPU process median "
        "(ms) | CPU cycle thread | dockerd CPU / cycle (mean) | background CPU scaler / dockerd "
        "(%) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in s["levels"]:
        ms = lv["ms"]
        bg = lv["background"]
        lines.append(
            f"| {lv['containers']} | {VARIANTS[lv['variant']]} | {ms['wall_s']['median']:.1f} "
            f"| {ms['wall_s']['p95']:.1f} | {ms['wall_s']['worst']:.1f} "
            f"| {ms['process_cpu_s']['median']:.1f} | {ms['thread_cpu_s']['median']:.1f} "
            f"| {ms['dockerd_cpu_s']['mean']:.1f} "
            f"| {bg['scaler_cpu_percent']:.1f} / {bg['dockerd_cpu_percent']:.1f} |"
        )
    lines += ["", "Median time per step (ms) within one cycle:", ""]
    header = "| step | " + " | ".join(
        f"{lv['containers']}, {VARIANTS[lv['variant']]}" for lv in s["levels"]
    )
    lines += [header + " |", "|---|" + "---:|" * len(s["levels"])]
    for step in STEPS:
        cells = " | ".join(f"{lv['steps_median_ms'][step]:.2f}" for lv in s["levels"])
        lines.append(f"| {step} | {cells} |")
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    """Cycle wall time (median, p95) against container count, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result.summary["levels"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, label in VARIANTS.items():
        mine = [lv for lv in levels if lv["variant"] == variant]
        xs = [lv["containers"] for lv in mine]
        left.plot(xs, [lv["ms"]["wall_s"]["median"] for lv in mine], "-o", label=f"{label}")
        left.plot(xs, [lv["ms"]["wall_s"]["p95"] for lv in mine], ":", color="grey")
        right.plot(xs, [lv["ms"]["dockerd_cpu_s"]["mean"] for lv in mine], "-o", label=label)
    goals = result.summary["goals_ms"]
    left.plot([int(k) for k in goals], list(goals.values()), "rx", label="goal (snapshot)")
    left.set(xlabel="managed containers", ylabel="wall time per cycle (ms)", xticks=list(LEVELS),
             title="Cycle wall time (median; p95 dotted)")  # fmt: skip
    left.legend(fontsize=8)
    right.set(xlabel="managed containers", ylabel="dockerd CPU per cycle (ms, mean)",
              xticks=list(LEVELS), title="The engine's CPU per cycle")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "scaler_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
