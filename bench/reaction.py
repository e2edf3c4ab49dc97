"""Benchmark 1: a backlog appears on a queue whose service is at its minimum; how long until the
first capacity the scaler adds starts consuming it? Four ways of reacting, side by side.

The whole stack runs in one throwaway Compose project (bench/stack_project.py): the stack's image,
its worker-io service and its scaler with the stack's default policy (compose/scaler-policy.yaml: a
2 s cycle, scale up at once, a 5 s up cooldown) but the host guard at 100 % (never binding, as in
benchmark 2: on a shared machine it would hold one variant and not another), whose policy file the
benchmark rewrites and reloads (SIGHUP) to switch between four **variants** of worker-io's reaction:
**warm pool + events** (`warm: 1`, `wakeup.events: true`: a booted replica consuming nothing waits
beside the serving one, and an arrival on the idle queue starts the decision at once), **cold +
events** (no pool, events on: the decision at once, then a new container), **cold + polling 2 s**
(no pool, `wakeup.events: false`: the old behaviour, the next 2 s tick sees the backlog) and
**KEDA-like 30 s** (no pool, no events, `interval_s: 30`, as scaler/simulate/policies/keda-like.yaml
polls: KEDA's default polling interval, then a new container). Only the scale-down window is
shortened (4 s instead of 30 s) so that worker-io is back at its minimum of one serving replica
within seconds between trials; nothing on the way up is changed. worker-io runs 4 threads per
replica (IO_CONCURRENCY=4) and each trial publishes 120 io tasks of 3 s over one connection: the
serving replica needs 90 s for them, so it cannot drain the backlog before added capacity starts.
The three 2 s variants take turns trial by trial (the order rotating each round, a policy reload
between them), so a change in the machine's load hits all three; the 30 s one runs after them.

Before each trial the benchmark waits until worker-io has one serving replica (the only worker
consuming io_intensive, asked with Celery's `active_queues`) and, for the warm variant, one warm
replica that answers and consumes nothing, and (event variants) the scaler's detector is up and
armed for worker-io, and worker-io's scale-up cooldown has run out since its last change (a backlog
within it waits for the cooldown whatever the variant); then it waits a random phase of the cycle
(real backlogs arrive at any phase) and publishes. **Added capacity** is any worker of worker-io
other than the one serving before the trial: for the warm variant the promoted warm replica (a
container that existed before the publish), otherwise a new container. Each trial times publish (the
first message sent) to the first task started on added capacity (its effect row in PostgreSQL,
stamped when the task begins), in parts: **detection** (publish to the start of the scaler cycle
that scaled up: the scaler's `wakeup` log line when an arrival woke it, else one interval after the
previous cycle's last decision), then for a promoted replica **decision and promote** (cycle start
to the worker's `Started consuming from` log line: reading the queues and the engine, deciding,
`add_consumer` confirmed) and for a new container **decision** (cycle start to the container's
creation), **container start** (to the engine's StartedAt) and **worker ready** (to the worker's
`ready.`), and last **first task** (to the first task's start there). Between trials the rest of the
backlog is purged. Each variant runs until 10 trials are valid (at most 14); a trial where no added
capacity consumed within 60 s is counted and its reason noted, never in the figures.

What a warm replica costs while it waits is measured once, with worker-io idle at one serving and
one warm replica: each container's CPU over 10 s (its cgroup's CPU time) and its memory (`docker
stats`: usage without the page cache, and the cgroup's resident set).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.context import ROOT, Context
from bench.polling import BenchTimeout, poll_until
from bench.result import Result
from bench.stack_project import BenchStack, docker_epoch, ready_at
from bench.stats import median, summary
from scaler.decide import depth_count
from scaler.policy import WakeupRules, load_policy

NAME = "reaction"
TITLE = "Reaction: backlog at minimum to the first added capacity consuming (benchmark 1)"
SERVICE = "worker-io"
QUEUE = "io_intensive"
TASK = "tasks.io_intensive.wait"
CONCURRENCY = 4  # threads per worker-io replica: one replica takes 90 s over the backlog
TASKS = 120
TASK_S = 3.0
TRIALS = 10  # valid trials wanted per variant
MAX_ATTEMPTS = 14
DEADLINE_S = 60.0
COST_WINDOW_S = 10.0
HOST_LIMITS = {"cpu_percent": 100, "memory_percent": 100}
UP_COOLDOWN_S = 5.0  # compose/scaler-policy.yaml's defaults.scale_up.cooldown_s (checked below)

# name -> (label, worker-io's warm pool, wakeup.events, interval_s or None for the stack's)
VARIANTS: dict[str, tuple[str, int, bool, float | None]] = {
    "warm-events": ("warm pool + events", 1, True, None),
    "cold-events": ("cold + events", 0, True, None),
    "cold-polling": ("cold + polling 2 s", 0, False, None),
    "keda-like": ("KEDA-like 30 s polling", 0, False, 30.0),
}
ROTATING = ("warm-events", "cold-events", "cold-polling")  # take turns trial by trial
GOALS_S = {"warm-events": 0.1, "cold-events": 1.5}  # issue 14: medians under these
PROMOTED_PARTS = ("detection", "decision_promote", "first_task")
COLD_PARTS = ("detection", "decision", "container_start", "worker_ready", "first_task")
PART_LABELS = {
    "detection": "Detection",
    "decision_promote": "Decision + promote (add_consumer)",
    "decision": "Decision (observe, decide, create)",
    "container_start": "Container start",
    "worker_ready": "Worker ready",
    "first_task": "First task",
}

_hostnames: dict[str, str] = {}  # container id -> its hostname (the worker's node suffix)


def reaction_policy(root: Path, variant: str) -> tuple[str, float]:
    """The stack's default policy with a short scale-down window and the variant's worker-io
    pool, detection and interval; and that interval."""
    _, warm, events, interval = VARIANTS[variant]
    policy: dict[str, Any] = yaml.safe_load((root / "compose/scaler-policy.yaml").read_text())
    policy["defaults"]["scale_down"] = {"stabilization_s": 4, "cooldown_s": 2, "max_step": 4}
    for service in policy["services"].values():
        service.pop("scale_down", None)
    cooldown = policy["defaults"]["scale_up"]["cooldown_s"]
    if cooldown != UP_COOLDOWN_S:
        raise ValueError(
            f"compose/scaler-policy.yaml defaults.scale_up.cooldown_s={cooldown}: "
            f"the benchmark waits {UP_COOLDOWN_S} s after a change; update it"
        )
    # The host guard never binds (as in benchmark 2): on a shared machine it would hold one
    # variant's scale-up and not another's, for reasons that are not the variant's.
    policy["host"] = dict(HOST_LIMITS)
    policy["wakeup"] = {**policy.get("wakeup", {}), "events": events}
    if interval is not None:
        policy["interval_s"] = interval
        policy["stale_after_s"] = max(float(policy.get("stale_after_s", 10.0)), 2 * interval)
    if warm:
        policy["services"][SERVICE]["warm"] = warm
    return yaml.safe_dump(policy, sort_keys=False), float(policy["interval_s"])


def _hostname(stack: BenchStack, container_id: str) -> str:
    if container_id not in _hostnames:
        _hostnames[container_id] = str(stack.inspect(container_id)["Config"]["Hostname"])
    return _hostnames[container_id]


def fleet(stack: BenchStack) -> dict[str, bool | None]:
    """Each running worker-io container -> whether its worker consumes io_intensive (None: it
    did not answer ``active_queues`` within a second)."""
    assert stack.app is not None
    ids = stack.running(SERVICE)
    hosts = {cid: _hostname(stack, cid) for cid in ids}
    nodes = [f"{QUEUE}@{host}" for host in hosts.values()]  # start-worker.sh's -n queue@%h
    inspect = stack.app.control.inspect(destination=nodes, timeout=1.0, limit=len(nodes))
    replies = inspect.active_queues() or {}
    consuming = {node.split("@", 1)[-1]: any(q.get("name") == QUEUE for q in queues)
                 for node, queues in replies.items()}  # fmt: skip
    return {cid: consuming.get(host) for cid, host in hosts.items()}


def settled(stack: BenchStack, variant: str) -> dict[str, bool | None] | None:
    """The fleet when worker-io is ready for a trial of ``variant`` (one serving replica, the
    pool full of answering idle workers, the detector armed), else None."""
    _, warm, events, _ = VARIANTS[variant]
    status = stack.status()
    svc = status["services"][SERVICE]
    if svc["current"] != 1 or int(svc.get("warm") or 0) != warm:
        return None
    if events:
        detection = status.get("detection") or {}
        if detection.get("mode") != "events" or SERVICE not in detection.get("armed", []):
            return None
    state = fleet(stack)
    serving = [c for c, consumes in state.items() if consumes]
    idle = [c for c, consumes in state.items() if consumes is False]
    if len(serving) != 1 or len(idle) != warm or len(state) != 1 + warm:
        return None
    return state


def steady(stack: BenchStack, variant: str, timeout_s: float = 240) -> dict[str, bool | None]:
    """The fleet once ``settled`` held twice in a row at least a second apart with the same
    containers: a replica just returned to (or booted into) the pool is then known to the
    scaler as ready, not only to the benchmark."""
    seen: list[tuple[float, dict[str, bool | None]]] = []

    def probe() -> dict[str, bool | None] | None:
        state = settled(stack, variant)
        if state is None:
            seen.clear()
            return None
        if seen and seen[0][1] == state and time.monotonic() - seen[0][0] >= 1.0:
            # A 30 s cycle cannot meet the 5 s cooldown: its last change was a tick ago.
            slow = (VARIANTS[variant][3] or 0) > UP_COOLDOWN_S
            return state if slow or cooled(stack) else None
        if not seen or seen[0][1] != state:
            seen[:] = [(time.monotonic(), state)]
        return None

    return poll_until(probe, f"{SERVICE} settled for a {variant} trial", timeout_s, 0.3)


def cooled(stack: BenchStack) -> bool:
    """Has worker-io's scale-up cooldown run out since its last change? A backlog within it
    waits for the cooldown, whatever the variant: not what this benchmark times."""
    now = time.time()
    changes = [r["ts"] for r in stack.scaler_logs(now - 30) if r.get("event") == "decision"
               and r.get("service") == SERVICE and r.get("action") in ("up", "down")
               and r.get("acted")]  # fmt: skip
    return not changes or now - max(changes) > UP_COOLDOWN_S + 0.5


def log_time(container_id: str, needle: str, since: float) -> float | None:
    """When the container first logged a line holding ``needle`` at or after ``since``."""
    out = subprocess.run(["docker", "logs", "-t", "--since", f"{since - 1:.3f}", container_id],
                         capture_output=True, text=True)  # fmt: skip
    for line in (out.stdout + out.stderr).splitlines():
        if needle in line:
            at = docker_epoch(line.split(" ", 1)[0])
            if at >= since:
                return at
    return None


def cycle_start(
    records: list[dict[str, Any]], interval: float, published: float
) -> tuple[float, str, float] | None:
    """(start of the cycle that first scaled worker-io up, "event" or "tick", when its decision
    was logged). An arrival that woke the loop logs ``wakeup`` just before that cycle starts;
    otherwise a tick started it, one interval after the previous cycle's last decision."""
    decisions = [r for r in records if r.get("event") == "decision"]
    ups = [r for r in decisions if r.get("service") == SERVICE and r.get("action") == "up"
           and r.get("acted") and r["ts"] >= published]  # fmt: skip
    if not ups:
        return None
    up = min(ups, key=lambda r: r["ts"])
    wakeups = [
        r["ts"] for r in records if r.get("event") == "wakeup"
        and SERVICE in r.get("services", []) and published <= r["ts"] <= up["ts"]
    ]  # fmt: skip
    previous = [r["ts"] for r in decisions if r.get("cycle") == up["cycle"] - 1]
    # The ring that started this cycle came after the previous cycle's decisions (an earlier
    # ring may have started that one, which then held: the backlog was still being published).
    woke = [w for w in wakeups if not previous or w >= max(previous)]
    if woke:
        return min(woke), "event", up["ts"]
    start = max(previous) + interval if previous else up["ts"]
    return min(start, up["ts"]), "tick", up["ts"]


def early_holds(
    records: list[dict[str, Any]], published: float, up_ts: float | None
) -> dict[str, Any]:
    """Decisions for worker-io after the publish that held before the one that scaled up (an
    early one saw only the first messages of the burst), and the first one's reasons."""
    held = [r for r in records if r.get("event") == "decision" and r.get("service") == SERVICE
            and r.get("action") == "hold" and published <= r["ts"]
            and (up_ts is None or r["ts"] < up_ts)]  # fmt: skip
    first = min(held, key=lambda r: r["ts"]) if held else None
    return {"early_holds": len(held),
            "early_hold_reasons": list(first.get("reasons", [])) if first else []}  # fmt: skip


def trial(stack: BenchStack, variant: str, index: int, interval: float) -> dict[str, Any]:
    """One backlog; the parts of the way to the first task on added capacity, or (when none
    consumed within the deadline) the scaler's reasons for worker-io."""
    stack.purge(QUEUE)
    state = steady(stack, variant)
    serving = {_hostname(stack, c) for c, consumes in state.items() if consumes}
    pooled = {c for c, consumes in state.items() if consumes is False}
    # The poll returns just after a cycle wrote its status, so publishing now would always meet
    # the same phase of the cycle: real backlogs arrive at any.
    time.sleep(random.Random(f"{variant}-{index}").uniform(0.0, interval))
    before = set(stack.running(SERVICE))
    prefix = f"react-{uuid.uuid4().hex[:6]}-{index}-"
    published = time.time()
    sent = stack.publish(TASK, [(f"{prefix}{i:03d}", {"duration": TASK_S, "key": f"{prefix}{i}"})
                                for i in range(TASKS)])  # fmt: skip

    def first_on_added() -> tuple[str, float] | None:
        added = [c for c in stack.running(SERVICE) if _hostname(stack, c) not in serving]
        if not added:
            return None
        hosts = {c: _hostname(stack, c) for c in added}
        rows = stack.effects("task_id LIKE %s", (prefix + "%",))
        starts = [(c, float(start)) for _, host, start, _ in rows for c, h in hosts.items()
                  if h in str(host)]  # fmt: skip
        return min(starts, key=lambda x: x[1]) if starts else None

    try:
        container, first_start = poll_until(first_on_added, "a task on added capacity",
                                            DEADLINE_S, 0.05)  # fmt: skip
    except BenchTimeout:
        reasons = stack.status()["services"][SERVICE].get("reasons", [])
        stack.purge(QUEUE)
        return {"timeout": "; ".join(reasons) or "no reason reported"}
    stack.purge(QUEUE)

    # From one interval before the backlog: the cycle before the one that scaled up is the
    # anchor for when a tick started that one. The decision is logged after acting, which may
    # be after the first task (a promote comes first, then the cold starts and the refill).
    def scaled() -> tuple[list[dict[str, Any]], tuple[float, str, float]] | None:
        records = stack.scaler_logs(published - interval - 1.0)
        found = cycle_start(records, interval, published)
        return (records, found) if found else None

    try:
        records, cycle = poll_until(scaled, "the scale-up's decision record", 30, 0.5)
    except BenchTimeout:
        records, cycle = stack.scaler_logs(published - interval - 1.0), None
    start = cycle[0] if cycle else published
    out: dict[str, Any] = {"detected_by": cycle[1] if cycle else "unknown",
                           "publish_s": sent - published, "published": published,
                           "first_start": first_start}  # fmt: skip
    if cycle:  # else detection and decision cannot be told apart: left out of the parts
        out["detection"] = max(start - published, 0.0)
    if container in before:  # a replica that was there: the promoted warm one
        consuming = log_time(container, "Started consuming from", published) or first_start
        out.update(kind="promoted" if container in pooled else "other",
                   first_task=max(first_start - consuming, 0.0))  # fmt: skip
        if cycle:
            out["decision_promote"] = max(consuming - start, 0.0)
    else:
        info = stack.inspect(container)
        created, started = docker_epoch(info["Created"]), docker_epoch(info["State"]["StartedAt"])
        ready = ready_at(container) or started
        out.update(
            kind="cold",
            container_start=started - created,
            worker_ready=ready - started,
            first_task=max(first_start - ready, 0.0),
        )
        if cycle:
            out["decision"] = created - start
    out["total"] = first_start - published
    out.update(early_holds(records, published, cycle[2] if cycle else None))
    # Cycles that saw the backlog but held because the host was past its CPU or memory limit.
    out["host_guard_cycles"] = sum(
        1 for r in records if r.get("event") == "decision" and r.get("service") == SERVICE
        and published <= r["ts"] and (cycle is None or r["ts"] < cycle[2])
        and any("host" in x for x in r.get("reasons", []))
    )  # fmt: skip
    return out


# -- what a warm replica costs while it waits ---------------------------------------------------


def cpu_seconds(container_id: str) -> float | None:
    """The container's CPU time so far, from its cgroup (v1 cpuacct, else v2 cpu.stat)."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat")
    if v2.exists():
        for line in v2.read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    return None


def rss_mib(container_id: str) -> float | None:
    """The container's resident anonymous memory (cgroup v1 total_rss, v2 anon), MiB."""
    for path, key in ((f"/sys/fs/cgroup/memory/docker/{container_id}/memory.stat", "total_rss"),
                      (f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.stat",
                       "anon")):  # fmt: skip
        p = Path(path)
        if p.exists():
            for line in p.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value) / 2**20
    return None


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def _mib(text: str) -> float | None:
    match = re.match(r"\s*([\d.]+)\s*([A-Za-z]+)", text)
    if not match or match.group(2) not in _UNITS:
        return None
    return float(match.group(1)) * _UNITS[match.group(2)] / 2**20


def idle_cost(serving: str, warm: str, window_s: float = COST_WINDOW_S) -> dict[str, Any]:
    """CPU (% of one core over ``window_s``) and memory of an idle serving and a warm replica."""
    ids = {"serving": serving, "warm": warm}
    t0, before = time.monotonic(), {k: cpu_seconds(c) for k, c in ids.items()}
    time.sleep(window_s)  # a measuring window, not a wait for a condition
    elapsed, after = time.monotonic() - t0, {k: cpu_seconds(c) for k, c in ids.items()}
    stats = subprocess.run(
        ["docker", "stats", "--no-stream", "--no-trunc", "--format", "{{json .}}", serving, warm],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    mem: dict[str, float | None] = {}
    for line in stats.splitlines():
        row = json.loads(line)
        for k, c in ids.items():
            if c.startswith(row.get("ID", "-")) or row.get("ID", "") == c:
                mem[k] = _mib(str(row.get("MemUsage", "")).split("/")[0])
    out: dict[str, Any] = {"window_s": elapsed}
    for k, c in ids.items():
        b, a = before[k], after[k]
        out[k] = {
            "cpu_percent": None if a is None or b is None else (a - b) / elapsed * 100,
            "mem_mib": mem.get(k),
            "rss_mib": rss_mib(c),
        }
    return out


# -- the run ------------------------------------------------------------------------------------


def run(ctx: Context) -> Result:
    trials = 3 if ctx.quick else TRIALS
    attempts = trials + (MAX_ATTEMPTS - TRIALS)
    started_at, t0 = time.time(), time.monotonic()
    texts = {v: reaction_policy(ctx.root, v) for v in VARIANTS}
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    timeouts: dict[str, list[str]] = {v: [] for v in VARIANTS}
    tried = {v: 0 for v in VARIANTS}
    cost: dict[str, Any] | None = None
    settings = {"LOG_LEVEL": "INFO", "IO_CONCURRENCY": str(CONCURRENCY)}
    with BenchStack(ctx, "reaction", settings, texts["cold-polling"][0]) as stack:
        loaded = "cold-polling"

        def one(variant: str, index: int) -> None:
            nonlocal loaded, cost
            if loaded != variant:
                stack.set_policy(texts[variant][0])
                loaded = variant
            if variant == "warm-events" and cost is None:
                state = steady(stack, variant)
                serving = next(c for c, consumes in state.items() if consumes)
                warm = next(c for c, consumes in state.items() if consumes is False)
                cost = idle_cost(serving, warm)
                ctx.log(f"reaction: idle cost {cost}")
            tried[variant] += 1
            outcome = trial(stack, variant, index, texts[variant][1])
            if "timeout" in outcome:
                timeouts[variant].append(str(outcome["timeout"]))
                ctx.log(f"reaction {variant} attempt {tried[variant]}: no added capacity "
                        f"consumed in {DEADLINE_S:.0f} s")  # fmt: skip
                return
            samples[variant].append(outcome)
            ctx.log(f"reaction {variant} attempt {tried[variant]}: {outcome['total']:.3f} s "
                    f"({outcome['kind']}, by {outcome['detected_by']}; "
                    f"{len(samples[variant])}/{trials} valid)")  # fmt: skip

        for i in range(attempts):
            order = ROTATING[i % len(ROTATING) :] + ROTATING[: i % len(ROTATING)]
            for variant in order:
                if len(samples[variant]) < trials and tried[variant] < attempts:
                    one(variant, i)
        # The detector's own counters after the event variants (rings, folded arrivals,
        # arrivals a free consumer took at once): they explain the detection figures.
        detector = stack.status().get("detection")
        for i in range(attempts):
            if len(samples["keda-like"]) < trials:
                one("keda-like", i)
    if not any(samples.values()):
        raise RuntimeError(f"no trial saw added capacity consume: {timeouts}")
    result = Result(
        name=NAME, title=TITLE, started_at=started_at, duration_s=time.monotonic() - t0,
        settings={"variants": "; ".join(f"{v}: {VARIANTS[v][0]}" for v in VARIANTS),
                  "valid trials": {v: len(s) for v, s in samples.items()},
                  "trials run": dict(tried),
                  "backlog": f"{TASKS} tasks of {TASK_S} s on {QUEUE}",
                  "service": f"{SERVICE} (threads, IO_CONCURRENCY={CONCURRENCY} per replica), "
                             "min 1 replica",
                  "policy": "compose/scaler-policy.yaml, scale-down window 4 s; per variant "
                            "worker-io's warm, wakeup.events and interval_s",
                  "order": "the three 2 s variants in turns (rotating), then KEDA-like",
                  "debounce_s": WakeupRules().debounce_s,
                  "host guard": f"host.cpu_percent {HOST_LIMITS['cpu_percent']}, "
                                f"memory_percent {HOST_LIMITS['memory_percent']} (never binding)"},
        samples={"trials": samples, "timeouts": timeouts, "idle_cost": cost,
                 "detector": detector},
        summary=summarise(samples),
    )  # fmt: skip
    result.notes = notes(result, trials)
    return result


def summarise(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: the total's median, p95, worst; each part's median over the trials it
    applies to; how the trials went (promoted or cold, by event or tick)."""
    out: dict[str, Any] = {}
    for variant, rows in samples.items():
        if not rows:
            continue
        names = (*COLD_PARTS, "decision_promote")
        parts = {p: summary([r[p] for r in rows if p in r]) for p in names
                 if any(p in r for r in rows)}  # fmt: skip
        out[variant] = {
            "total": summary([r["total"] for r in rows]),
            "parts": parts,
            "kinds": dict(Counter(r["kind"] for r in rows)),
            "detected_by": dict(Counter(r["detected_by"] for r in rows)),
            "publish_s": summary([r["publish_s"] for r in rows]),
        }
    return out


def burst_floor(result: Result) -> list[str]:
    """When the burst first is what worker-io's target scales on: the earliest any detection
    could decide up. A second replica is wanted once the work (waiting + in flight) is past the
    target's band for one replica; the publisher sends the burst one message after another."""
    rows = result.samples["trials"].get("warm-events", [])
    gaps = [r["publish_s"] / (TASKS - 1) for r in rows if r.get("publish_s")]
    if not gaps:
        return []
    target = load_policy(ROOT / "compose/scaler-policy.yaml", env={}).services[SERVICE].target
    if target.tasks_per_replica is None:
        return []
    tpr, band = target.tasks_per_replica, target.tolerance
    needed = next(w for w in range(1, 10_000) if depth_count(tpr, band, w, 1) > 1)
    floor = median(gaps) * (needed - 1)
    total = result.summary["warm-events"]["total"]["median"]
    return [
        f"warm pool + events: no decision can want a second replica before the burst is "
        f"{needed} tasks (worker-io's target, {target.tasks_per_replica:g} per replica within "
        f"{target.tolerance:g}, counts waiting and in flight); the publisher sent a message "
        f"every {median(gaps) * 1000:.1f} ms (median), so the {needed}th left "
        f"{floor:.3f} s after the first: the floor of detection with this target. From there to "
        f"the first task on the promoted replica: {total - floor:.3f} s of the "
        f"{total:.3f} s median."
    ]


def notes(result: Result, wanted: int) -> list[str]:
    """The goals met or missed with figures; trials left out and why; the warm replica's cost."""
    summ, timeouts = result.summary, result.samples["timeouts"]
    out: list[str] = []
    for variant, goal in GOALS_S.items():
        if variant not in summ:
            out.append(f"{VARIANTS[variant][0]}: no valid trial, goal (median under {goal} s) "
                       "not judged.")  # fmt: skip
            continue
        s = summ[variant]["total"]
        verdict = "met" if s["median"] < goal else f"missed by {s['median'] - goal:.3f} s"
        line = (f"Goal ({VARIANTS[variant][0]}: median under {goal} s): median {s['median']:.3f} "
                f"s, p95 {s['p95']:.3f} s, {verdict}.")  # fmt: skip
        if s["median"] >= goal:
            parts = summ[variant]["parts"]
            largest = max(parts, key=lambda p: parts[p]["median"])
            line += (f" The largest part is {PART_LABELS[largest].lower()} (median "
                     f"{parts[largest]['median']:.3f} s).")  # fmt: skip
        out.append(line)
    out += burst_floor(result)
    polling = summ.get("cold-polling")
    for variant in ("warm-events", "cold-events", "keda-like"):
        if polling and variant in summ:
            ratio = summ[variant]["total"]["median"] / polling["total"]["median"]
            out.append(f"{VARIANTS[variant][0]}: median {ratio:.2f}x cold + polling 2 s's "
                       f"({summ[variant]['total']['median']:.3f} s against "
                       f"{polling['total']['median']:.3f} s).")  # fmt: skip
    warm = summ.get("warm-events")
    if warm and warm["kinds"].get("promoted", 0) < sum(warm["kinds"].values()):
        out.append(f"warm pool + events: {warm['kinds'].get('cold', 0)} of "
                   f"{sum(warm['kinds'].values())} trials were first served by a new container, "
                   "not the promoted warm replica (kept in the figures: that is how the variant "
                   "behaved).")  # fmt: skip
    for variant in ("warm-events", "cold-events"):
        rows = result.samples["trials"].get(variant, [])
        ticked = [r for r in rows if r["detected_by"] == "tick"]
        held = [r for r in ticked if r.get("early_holds")]
        if held:
            ticks = [r["total"] for r in held]
            out.append(
                f"{VARIANTS[variant][0]}: in {len(held)} of {len(rows)} trials the first arrival "
                "rang at once and its decision saw only the first messages of the burst "
                f'("{"; ".join(held[0]["early_hold_reasons"])}": under the target, so it held); '
                "the service was not armed again at a level (scaler.arming) or the rest of the "
                f"burst did not reach it, and the next tick scaled up ({min(ticks):.2f}-"
                f"{max(ticks):.2f} s in all)."
            )
        if len(ticked) > len(held):
            out.append(f"{VARIANTS[variant][0]}: in {len(ticked) - len(held)} trial(s) a tick "
                       "came before the event (the backlog landed just before a cycle) and "
                       "started the decision.")  # fmt: skip
    debounce = float(result.settings.get("debounce_s") or WakeupRules().debounce_s)
    for variant in ("warm-events", "cold-events"):
        event = [r["detection"] for r in result.samples["trials"].get(variant, [])
                 if r["detected_by"] == "event"]  # fmt: skip
        if event and median(event) >= 0.75 * debounce:
            out.append(
                f"{VARIANTS[variant][0]}: event detection took {median(event):.3f} s (median), "
                f"about the debounce window (wakeup.debounce_s {debounce:g} s), not the "
                "milliseconds a keyspace notification takes: the serving replica's idle threads "
                "take the first messages at once, so the first arrival finds nothing waiting and "
                "rings nothing (scaler.wakeup.Debouncer), yet it opens the window, and the next "
                "arrivals are folded into the ring at the window's end. Not ringing should not "
                "open the window."
            )
    for variant, rows in result.samples["trials"].items():
        unknown = sum(1 for r in rows if r["detected_by"] == "unknown")
        if unknown:
            out.append(f"{VARIANTS[variant][0]}: in {unknown} of {len(rows)} trials the "
                       "scaler's decision record was not found when the trial read its log, so "
                       "detection and decision are left out of the parts there (the total "
                       "stands).")  # fmt: skip
    for variant, lost in timeouts.items():
        if lost:
            n = len(lost) + len(result.samples["trials"][variant])
            out.append(f"{VARIANTS[variant][0]}: {len(lost)} of {n} trials saw no added capacity "
                       f"consume within {DEADLINE_S:.0f} s and are left out of the figures; the "
                       f"scaler's reasons at the deadline: {lost[0]}")  # fmt: skip
        if len(result.samples["trials"][variant]) < wanted:
            out.append(f"{VARIANTS[variant][0]}: only {len(result.samples['trials'][variant])} "
                       f"valid trials of the {wanted} wanted.")  # fmt: skip
    for variant, rows in result.samples["trials"].items():
        guarded = [r["host_guard_cycles"] for r in rows if r.get("host_guard_cycles")]
        if guarded:
            out.append(f"{VARIANTS[variant][0]}: in {len(guarded)} of {len(rows)} trials the "
                       f"scaler saw the backlog but held for {min(guarded)}-{max(guarded)} cycles "
                       "because host CPU or memory was past the policy's host limit (the "
                       "machine was busy): that wait is in detection.")  # fmt: skip
    cost = result.samples.get("idle_cost")
    if cost:
        w, s = cost["warm"], cost["serving"]
        out.append(
            f"What a warm replica costs while it waits (worker-io idle, {cost['window_s']:.0f} s): "
            f"CPU {_fmt(w['cpu_percent'], 2)} % of a core against {_fmt(s['cpu_percent'], 2)} % "
            f"for the idle serving replica; memory {_fmt(w['mem_mib'], 1)} MiB (docker stats; "
            f"{_fmt(w['rss_mib'], 1)} MiB resident) against {_fmt(s['mem_mib'], 1)} MiB "
            f"({_fmt(s['rss_mib'], 1)} MiB): a warm replica costs what an idle serving one does."
        )
    return out


def _fmt(x: float | None, digits: int) -> str:
    return "?" if x is None else f"{x:.{digits}f}"


def render(result: Result) -> str:
    summ = result.summary
    valid, run_ = result.settings["valid trials"], result.settings["trials run"]
    lines = ["| Variant | Valid / run | Median (s) | p95 (s) | Worst (s) | Goal |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for variant, (label, *_) in VARIANTS.items():
        if variant not in summ:
            lines.append(f"| {label} | 0 / {run_.get(variant, 0)} | - | - | - | - |")
            continue
        s = summ[variant]["total"]
        goal = GOALS_S.get(variant)
        verdict = "-"
        if goal is not None:
            verdict = f"< {goal} s: " + ("met" if s["median"] < goal else "missed")
        lines.append(f"| {label} | {valid[variant]} / {run_[variant]} | {s['median']:.3f} | "
                     f"{s['p95']:.3f} | {s['worst']:.3f} | {verdict} |")  # fmt: skip
    lines += ["", "Parts, median (s) over the trials each applies to (- where it does not):", "",
              "| Variant | " + " | ".join(PART_LABELS.values()) + " |",
              "|---|" + "---|" * len(PART_LABELS)]  # fmt: skip
    for variant, (label, *_) in VARIANTS.items():
        if variant not in summ:
            continue
        parts = summ[variant]["parts"]
        cells = [f"{parts[p]['median']:.3f}" if p in parts else "-" for p in PART_LABELS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cost = result.samples.get("idle_cost")
    if cost:
        lines += ["", f"A waiting warm replica against an idle serving one (worker-io, "
                      f"{cost['window_s']:.0f} s window):", "",
                  "| Replica | CPU (% of a core) | Memory, docker stats (MiB) | Resident (MiB) |",
                  "|---|---|---|---|"]  # fmt: skip
        for who in ("warm", "serving"):
            c = cost[who]
            lines.append(f"| {who} | {_fmt(c['cpu_percent'], 2)} | {_fmt(c['mem_mib'], 1)} | "
                         f"{_fmt(c['rss_mib'], 1)} |")  # fmt: skip
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if result.samples["trials"].get(v)]
    data = [[r["total"] for r in result.samples["trials"][v]] for v in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot(data, whis=(5, 95), showfliers=False, medianprops={"color": "black"})
    for i, values in enumerate(data, start=1):
        jitter = random.Random(i)
        ax.scatter([i + jitter.uniform(-0.12, 0.12) for _ in values], values, s=10, alpha=0.6,
                   color="tab:blue", zorder=3)  # fmt: skip
        p95 = result.summary[names[i - 1]]["total"]["p95"]
        ax.plot([i - 0.3, i + 0.3], [p95, p95], color="tab:purple", linewidth=2,
                label="p95" if i == 1 else None)  # fmt: skip
    for variant, goal in GOALS_S.items():
        if variant in names:
            x = names.index(variant) + 1
            ax.plot([x - 0.4, x + 0.4], [goal, goal], color="red", linestyle="--", linewidth=1,
                    label="goal" if variant == "warm-events" else None)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(names) + 1), [VARIANTS[v][0] for v in names], fontsize=8)
    ax.set_ylabel("seconds (log scale)")
    ax.set_title("Publish to the first task on added capacity (box: quartiles and median, "
                 "whiskers p5-p95, dots: trials)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "reaction.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
