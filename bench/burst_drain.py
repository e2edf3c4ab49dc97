"""Benchmark 2: the same burst drained under six policies, all run by the same scaler.

The whole stack runs in one throwaway Compose project (bench/stack_project.py) and its scaler
switches policy between runs (the policy file is rewritten and reloaded with SIGHUP), so what is
compared is the policy, never the machinery. The burst must be I/O-bound for real on 2 cores, so
that the replica count, not the CPU, sets the pace: worker-io runs 4 threads per replica here
(IO_CONCURRENCY=4 instead of the stack's 32) and each task waits 1.0-2.0 s (uniform, fixed seed).
One replica then drains about 2.7 tasks/s and six about 16 tasks/s, a few percent of the host's CPU
(sampled during every run and reported), so more replicas drain faster without contending for the
cores. 900 tasks let the oracle drain in about a minute, long enough that the few seconds a policy
needs to react are a small share of it. The burst is published over one connection before the clock
starts and every time is measured from "burst fully enqueued". Publishing takes 2-3 s here, in which
the oracle's six warm replicas start about 60 tasks and one replica about 10: a head start that
favours the oracle, so the other policies' ratios err on the unfavourable side.

Policies, as policy fields for worker-io (every other service keeps the stack's rules): **static**
(min = max = 1), **oracle** (min = max = 6, the stack's max: the fastest drain this service allows,
warm before the burst), **default** (compose/scaler-policy.yaml's rules unchanged: a 2 s cycle, 32
tasks per replica, +4 or +100 % per step, 5 s up cooldown, 30 s down window, events on),
**default-warm** (the same with a warm pool of one, `warm: 1`: a booted replica consuming nothing
beside the serving ones, promoted first on a scale-up and refilled; serving + warm stay within
max_replicas), **keda-like** (KEDA's defaults on the HPA: `interval_s: 30`, depth only with
`tasks_per_replica: 4` = the replica's concurrency, no latency target, no emergency, CPU ignored, +4
or +100 % per step, `scale_down.stabilization_s: 300`, polling only) and **cpu-threshold** (the
seed's intent: `interval_s: 30`, `resources.cpu_percent: 80` adds one replica while the workers'
mean CPU is over 80 % with work waiting (the seed also wants more than QUEUE_THRESHOLD waiting; the
policy has no such floor, so it is a little more eager), depth ignored (`tasks_per_replica`
1,000,000), one replica down per 30 s once the 60 s down window holds no high-CPU cycle, polling
only). All six run with the same host guard, `host.cpu_percent: 100` and `memory_percent: 100`
(never binding), so the guard cannot stop one policy and not another: the previous run on a loaded
machine was void for that reason.

Before each run worker-io is brought to the policy's starting count with every worker consuming
(pinned to 1, the policy loaded, unpinned; the oracle then at 6; default-warm with its warm replica
booted). Each run is watched for a fixed horizon of 135 s, sampled every 0.5 s: queue depth, running
worker-io containers (the engine's count, as the scaler's backend reads it: warm replicas included),
the warm pool's size (the scaler's status), tasks done (effect rows in PostgreSQL) and host CPU.
**Drain time** is enqueued to the last effect. A run still draining at the horizon is stopped there
(static needs about 5.5 minutes) and its drain time extrapolated at the rate of its last 30 s with
its last replica count (marked *). **Replica-seconds** integrate the container count, over the drain
and over the horizon (or the drain, if longer), which also charges the replicas a policy keeps after
the drain: the oracle keeps 6; the warm replicas' share is its own column. Latency is each task's
start minus its publish time. Ratios are to the oracle of the same run.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.context import Context
from bench.polling import poll_until
from bench.result import Result
from bench.stack_project import BenchStack
from bench.stats import median, percentile, ratio

NAME = "burst_drain"
TITLE = "Burst drain: six policies on the same burst (benchmark 2)"
SERVICE = "worker-io"
QUEUE = "io_intensive"
TASK = "tasks.io_intensive.wait"
CONCURRENCY = 4  # threads per worker-io replica: low, so one replica is the bottleneck
DURATION_S = (1.0, 2.0)  # each task's wait: long enough that the drain is I/O-bound
TASKS = 900
QUICK_TASKS = 200
HORIZON_S = 135.0
QUICK_HORIZON_S = 45.0
RATE_WINDOW_S = 30.0  # a capped run's drain rate is read over its last 30 s
SAMPLE_S = 0.5
MAX_REPLICAS = 6
GOALS = {"drain": 1.15, "replica_seconds": 0.6}
ORDER = ("static", "oracle", "default", "default-warm", "keda-like", "cpu-threshold")
WARM = 1  # default-warm's pool: the default policy with worker-io `warm: 1`
EVENT_DRIVEN = ("default", "default-warm")  # wakeup.events on: they scale during the publish
HOST_LIMITS = {"cpu_percent": 100, "memory_percent": 100}


def policies(root: Path) -> dict[str, str]:
    """Each policy as YAML: the stack's policy, the same host limits, worker-io's rules replaced."""
    base: dict[str, Any] = yaml.safe_load((root / "compose/scaler-policy.yaml").read_text())
    base["host"] = dict(HOST_LIMITS)
    if base["services"][SERVICE]["max_replicas"] != MAX_REPLICAS:
        raise ValueError(
            f"compose/scaler-policy.yaml services.{SERVICE}.max_replicas="
            f"{base['services'][SERVICE]['max_replicas']}: the oracle expects {MAX_REPLICAS}"
        )

    def variant(top: dict[str, Any], rules: dict[str, Any] | None) -> str:
        policy = json.loads(json.dumps(base))
        policy.update(top)
        if rules is not None:
            policy["services"][SERVICE] = {"queues": [QUEUE], **rules}
        return yaml.safe_dump(policy, sort_keys=False)

    # The 30 s pollers poll only, as scaler/simulate/policies/ has them.
    slow = {"interval_s": 30.0, "stale_after_s": 60.0, "wakeup": {"events": False}}
    warm = json.loads(json.dumps(base["services"][SERVICE]))
    return {
        "static": variant({}, {"min_replicas": 1, "max_replicas": 1}),
        "oracle": variant({}, {"min_replicas": MAX_REPLICAS, "max_replicas": MAX_REPLICAS}),
        "default": variant({}, None),
        "default-warm": variant({}, {**warm, "warm": WARM}),
        "keda-like": variant(slow, {
            "max_replicas": MAX_REPLICAS,
            "target": {"tasks_per_replica": CONCURRENCY, "latency_s": None, "tolerance": 0.1},
            "resources": {"cpu_percent": 100, "memory_percent": 100},
            "scale_up": {"stabilization_s": 0, "cooldown_s": 0, "max_step": 4,
                         "max_step_percent": 100},
            "scale_down": {"stabilization_s": 300, "cooldown_s": 0, "max_step": 6},
        }),
        "cpu-threshold": variant(slow, {
            "max_replicas": MAX_REPLICAS,
            "target": {"tasks_per_replica": 1_000_000, "tolerance": 0.0},
            "resources": {"cpu_percent": 80, "memory_percent": 100},
            "scale_up": {"stabilization_s": 0, "cooldown_s": 0, "max_step": 1,
                         "max_step_percent": 1, "select": "min"},
            "scale_down": {"stabilization_s": 60, "cooldown_s": 30, "max_step": 1},
        }),
    }  # fmt: skip


def _control(stack: BenchStack, verb: str, body: dict[str, Any] | None = None) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.scaler_port}/services/{SERVICE}/{verb}",
        method="POST", data=json.dumps(body or {}).encode(),
        headers={"Authorization": f"Bearer {stack.values['SCALER_TOKEN']}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def prepare(stack: BenchStack, policy: str, start_count: int, warm: int = 0) -> None:
    """worker-io at 1, the policy loaded, then at the policy's starting count, every worker
    consuming (the oracle is warm: its replicas are running before the burst, by definition),
    and ``warm`` more booted in the pool, consuming nothing (the scaler's status says so)."""
    stack.purge(QUEUE)
    _control(stack, "pin", {"replicas": 1, "reason": "bench reset"})

    def at_one() -> bool:  # one serving; a pin keeps the warm pool, if the policy has one
        svc = stack.status()["services"][SERVICE]
        pool = int(svc.get("warm") or 0)
        return svc["current"] == 1 and len(stack.running(SERVICE)) == 1 + pool

    poll_until(at_one, f"{SERVICE} at 1 serving replica", 180, 0.5)
    stack.set_policy(policy)
    _control(stack, "unpin")

    def ready() -> bool:
        svc = stack.status()["services"][SERVICE]
        return (stack.all_ready(SERVICE, start_count + warm) and svc["current"] == start_count
                and int(svc.get("warm") or 0) == warm)  # fmt: skip

    poll_until(ready, f"{SERVICE} at {start_count} ready replicas and {warm} warm", 120, 0.5)


def burst(stack: BenchStack, n: int, horizon: float) -> dict[str, Any]:
    """Enqueue the burst, then sample for the horizon; a run not drained by then is capped."""
    rng = random.Random(42)
    prefix = f"burst-{uuid.uuid4().hex[:6]}-"
    calls = [(f"{prefix}{i:05d}", {"duration": round(rng.uniform(*DURATION_S), 3),
                                   "key": f"{prefix}{i:05d}"}) for i in range(n)]  # fmt: skip
    publish_start = time.time()
    t0 = stack.publish(TASK, calls)  # the clock starts with the burst fully enqueued
    samples: list[tuple[float, int, int, int, float, int]] = []
    psutil.cpu_percent(interval=None)  # the first call only sets psutil's reference point
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            at = time.time()
            try:
                row = (
                    at - t0,
                    stack.depth(QUEUE),
                    len(stack.running(SERVICE)),
                    stack.count_done(prefix),
                    psutil.cpu_percent(interval=None),
                    # the pool's size, as the scaler's last cycle saw it (status, every 2 s)
                    int(stack.status()["services"][SERVICE].get("warm") or 0),
                )
            except Exception:  # a missed sample is a gap in the plot, not a failed run
                row = None
            if row is not None:
                samples.append(row)
            stop.wait(max(SAMPLE_S - (time.time() - at), 0.0))  # fmt: skip

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # The horizon is a fixed measuring window, the same for every policy: not a state wait.
        time.sleep(max(horizon - (time.time() - t0), 0.0))
    finally:
        stop.set()
        sampler.join(timeout=10)
    rows = stack.effects("task_id LIKE %s", (prefix + "%",))
    stack.purge(QUEUE)  # a capped run's rest is not the next policy's work
    published = publish_start - t0
    latencies = sorted((float(start) - t0, float(start) - t0 - published)
                       for _, _, start, _ in rows)  # fmt: skip
    out: dict[str, Any] = {"samples": samples, "latency": latencies, "publish_s": -published,
                           "done": len(rows), "extrapolated": len(rows) < n}  # fmt: skip
    if len(rows) >= n:
        out["drain_s"] = max(float(end) for *_, end in rows) - t0
    else:
        out["drain_s"] = extrapolate(samples, n)
    return out


def extrapolate(samples: list[Any], n: int) -> float:
    """When a capped run would have drained: its rate over the last RATE_WINDOW_S carried on."""
    end, done_end = samples[-1][0], samples[-1][3]
    earlier = [s for s in samples if s[0] <= end - RATE_WINDOW_S]
    t_from, done_from = (earlier[-1][0], earlier[-1][3]) if earlier else (0.0, 0)
    rate = (done_end - done_from) / max(end - t_from, SAMPLE_S)
    if rate <= 0:
        raise RuntimeError(f"no task finished in the last {RATE_WINDOW_S:.0f} s of a capped run")
    return float(end + (n - done_end) / rate)


def replica_seconds(samples: list[list[float]], until: float) -> float:
    """The container count integrated over [0, until] (a step function between samples; past
    the last sample, its count carries on: the extrapolated tail of a capped run)."""
    area = 0.0
    for current, following in itertools.pairwise(samples):
        t, replicas, t_next = current[0], current[2], following[0]
        if t >= until:
            break
        area += replicas * (min(t_next, until) - max(t, 0.0))
    if samples and samples[-1][0] < until:
        area += samples[-1][2] * (until - samples[-1][0])
    return area


def run(ctx: Context) -> Result:
    n = QUICK_TASKS if ctx.quick else TASKS
    horizon = QUICK_HORIZON_S if ctx.quick else HORIZON_S
    texts = policies(ctx.root)
    started_at, t0 = time.time(), time.monotonic()
    runs: dict[str, Any] = {}
    settings = {"LOG_LEVEL": "INFO", "IO_CONCURRENCY": str(CONCURRENCY)}
    with BenchStack(ctx, "drain", settings, texts["default"]) as stack:
        for name in ORDER:
            warm = WARM if name == "default-warm" else 0
            prepare(stack, texts[name], MAX_REPLICAS if name == "oracle" else 1, warm)
            ctx.log(f"burst drain: {name}: {n} tasks")
            runs[name] = burst(stack, n, horizon)
            ctx.log(f"burst drain: {name}: {runs[name]['done']}/{n} done in the horizon, drain "
                    f"{runs[name]['drain_s']:.1f} s")  # fmt: skip
        _control(stack, "pin", {"replicas": 1})  # fewer containers to stop on the way out
    result = Result(
        name=NAME, title=TITLE, started_at=started_at, duration_s=time.monotonic() - t0,
        settings={"burst": f"{n} io tasks waiting {DURATION_S[0]}-{DURATION_S[1]} s (uniform, "
                           f"seed 42) on {QUEUE}, enqueued before the clock starts",
                  "service": f"{SERVICE}: threads, IO_CONCURRENCY={CONCURRENCY} per replica, "
                             f"1..{MAX_REPLICAS} replicas",
                  "host guard (all policies)": f"host.cpu_percent {HOST_LIMITS['cpu_percent']}, "
                                               f"memory_percent {HOST_LIMITS['memory_percent']}",
                  "horizon_s": horizon, "sample_every_s": SAMPLE_S, "policies": list(ORDER)},
        samples={name: {k: r[k] for k in ("samples", "latency", "drain_s", "publish_s", "done",
                                          "extrapolated")}
                 for name, r in runs.items()},
        summary=summarise(runs, horizon),
    )  # fmt: skip
    result.notes = goal_notes(result, n, horizon)
    return result


def summarise(runs: dict[str, Any], horizon: float) -> dict[str, Any]:
    """Per policy: drain, replica-seconds (drain, horizon), host CPU, latency; ratios to oracle."""
    oracle = runs["oracle"]
    summ: dict[str, Any] = {}
    for name, r in runs.items():
        h = max(horizon, r["drain_s"])
        in_drain = [s[4] for s in r["samples"] if 0 < s[0] <= min(r["drain_s"], horizon)]
        lat = [x[1] for x in r["latency"]]
        rs_drain = replica_seconds(r["samples"], r["drain_s"])
        rs_horizon = replica_seconds(r["samples"], h)
        summ[name] = {
            "drain_s": r["drain_s"],
            "extrapolated": r["extrapolated"],
            "drain_ratio": ratio(r["drain_s"], oracle["drain_s"]),
            "rs_drain": rs_drain,
            "rs_drain_ratio": ratio(rs_drain, replica_seconds(oracle["samples"],
                                                              oracle["drain_s"])),
            "rs_horizon": rs_horizon,
            "rs_horizon_ratio": ratio(rs_horizon, replica_seconds(oracle["samples"], h)),
            "peak_replicas": max((s[2] for s in r["samples"]), default=0),
            # of the horizon's replica-seconds, those of warm replicas (consuming nothing)
            "warm_s_horizon": replica_seconds([[s[0], 0, s[5]] for s in r["samples"]
                                               if len(s) > 5], h),
            "host_cpu_mean": sum(in_drain) / len(in_drain) if in_drain else None,
            "latency_p50_s": median(lat),
            "latency_p95_s": percentile(lat, 95),
        }  # fmt: skip
    return summ


def breakeven_horizon(result: Result) -> float | None:
    """The horizon past which the default policy's replica-seconds fall to the goal's share of
    the oracle's (its count after the run carried on), or None if they never do."""
    data = result.samples["default"]["samples"]
    if not data:
        return None
    end, last = data[-1][0], data[-1][2]
    area = replica_seconds(data, end)
    share = GOALS["replica_seconds"] * MAX_REPLICAS
    if last >= share:
        return None
    return max((area - last * end) / (share - last), end)


def goal_notes(result: Result, n: int, horizon: float) -> list[str]:
    """The goals, met or missed and by how much; none judged when the run is not valid."""
    summ = result.summary
    d, o = summ["default"], summ["oracle"]
    notes: list[str] = []
    cpu = [s["host_cpu_mean"] for s in summ.values() if s["host_cpu_mean"] is not None]
    if cpu:
        notes.append(
            f"Host CPU during the drains: {min(cpu):.0f}-{max(cpu):.0f} % (mean per run; the "
            f"oracle {o['host_cpu_mean'] or 0:.0f} %): the drain was paced by the replicas, not "
            "by the cores."
            if max(cpu) < 80 else
            f"Host CPU during the drains reached {max(cpu):.0f} % (mean per run): the cores, not "
            "only the replicas, limited the pace."
        )  # fmt: skip
    capped = [name for name, s in summ.items() if s["extrapolated"]]
    if capped:
        notes.append(
            f"* Not drained within the {horizon:.0f} s horizon, drain time extrapolated: "
            + ", ".join(f"{name} ({result.samples[name]['done']}/{n} done)" for name in capped)
            + "."
        )
    if "cpu-threshold" in summ and summ["cpu-threshold"]["peak_replicas"] <= 1:
        notes.append(
            "cpu-threshold never scaled: the workers wait on I/O, so their CPU stays far below "
            "80 % however long the queue; a CPU rule cannot see an I/O-bound backlog."
        )
    notes += warm_notes(summ)
    if validity(result):
        notes.append(
            f"Goals (default policy: drain <= {GOALS['drain']}x the oracle with <= "
            f"{GOALS['replica_seconds']}x its replica-seconds) not judged from this run (see "
            f"above); as measured: {d['drain_ratio']:.2f}x and {d['rs_horizon_ratio']:.2f}x."
        )
        return notes
    drain_ok = d["drain_ratio"] is not None and d["drain_ratio"] <= GOALS["drain"]
    rs_ok = d["rs_horizon_ratio"] is not None and d["rs_horizon_ratio"] <= GOALS["replica_seconds"]
    notes.append(
        f"Goal (default policy): drain <= {GOALS['drain']}x the oracle: "
        f"{d['drain_ratio']:.2f}x, {'met' if drain_ok else 'missed'}; replica-seconds <= "
        f"{GOALS['replica_seconds']}x the oracle's over the {horizon:.0f} s horizon: "
        f"{d['rs_horizon_ratio']:.2f}x, {'met' if rs_ok else 'missed'}."
    )
    if not drain_ok:
        gap = d["drain_s"] - o["drain_s"]
        notes.append(
            f"Drain missed by {d['drain_ratio'] - GOALS['drain']:.2f}x: the default policy starts "
            f"at one replica and drains {gap:.1f} s after the oracle: its reaction (benchmark 1) "
            "and the up cooldown before the last step, while fewer replicas work the backlog."
        )
    if not rs_ok:
        breakeven = breakeven_horizon(result)
        when = (f"over a horizon of {breakeven:.0f} s or more (the default back at its floor, "
                "the oracle still at 6) it would be met" if breakeven else
                "it stays above that share however long the horizon")  # fmt: skip
        notes.append(
            f"Replica-seconds missed by {d['rs_horizon_ratio'] - GOALS['replica_seconds']:.2f}x. "
            f"While the backlog lasts the default runs the maximum, as the oracle does (over the "
            f"drain alone it uses {d['rs_drain_ratio']:.2f}x the oracle's): draining an "
            "I/O-bound burst at the oracle's pace takes the oracle's replicas. The saving is "
            "after the drain, and the 30 s scale-down window plus 2 replicas per 10 s cooldown "
            f"keep most replicas for about a minute of the {horizon:.0f} s horizon; {when}. "
            "The ratio is the horizon's choice: the goal is met only for bursts at least that "
            "far apart."
        )
    if n < TASKS:
        notes.append(f"Quick run: {n} tasks instead of {TASKS}, horizon {horizon:.0f} s.")
    return notes


def warm_notes(summ: dict[str, Any]) -> list[str]:
    """A pool of one against none, the same default rules otherwise (issue 14)."""
    if "default-warm" not in summ or "default" not in summ:
        return []
    w, d = summ["default-warm"], summ["default"]
    over = w["peak_replicas"] > MAX_REPLICAS
    return [
        "default and default-warm decide on arrivals (wakeup.events), so their first replicas "
        "start while the burst is still being published, on the same 2 cores: their publishing "
        "is slower than the polling policies' and is left out of the check of the machine's load.",
        f"A warm pool of {WARM} (default-warm: the default policy with worker-io `warm: {WARM}`) "
        f"against none (default): drain {w['drain_s']:.1f} s against {d['drain_s']:.1f} s "
        f"({w['drain_s'] / d['drain_s']:.2f}x), latency p50 {w['latency_p50_s']:.1f} s against "
        f"{d['latency_p50_s']:.1f} s and p95 {w['latency_p95_s']:.1f} s against "
        f"{d['latency_p95_s']:.1f} s; replica-seconds over the horizon {w['rs_horizon']:.0f} "
        f"against {d['rs_horizon']:.0f} ({w['rs_horizon'] / d['rs_horizon']:.2f}x), of which "
        f"{w['warm_s_horizon']:.0f} s are warm replicas waiting (the pool's count from the "
        "scaler's status, read every sample: a 2 s cycle's resolution). The pool obeys "
        f"max_replicas ({MAX_REPLICAS}) with the serving ones, so at the peak it gives way to "
        "serving replicas."
        + (
            f" Peak containers {w['peak_replicas']}, over max_replicas for a moment: when the "
            "serving replicas reached the maximum, the warm one was released only after the "
            "cold ones had started (in the same scale call) and ran while it stopped."
            if over
            else ""
        ),
    ]


def validity(result: Result) -> list[str]:
    """Why a run cannot support the comparison, read off its own samples (empty when it can)."""
    drains = {n: s["drain_s"] for n, s in result.summary.items()}
    # Event-driven policies start containers while the burst is still being published (on the
    # same cores), so their publishing time says nothing about other work on the machine.
    publish = {n: result.samples[n]["publish_s"] for n in drains if n not in EVENT_DRIVEN}
    problems = []
    fastest = min(drains, key=lambda n: drains[n])
    if fastest != "oracle" and drains[fastest] < 0.95 * drains["oracle"]:
        problems.append(
            f"the oracle (6 replicas from the start) drained in {drains['oracle']:.0f} s, slower "
            f"than {fastest} ({drains[fastest]:.0f} s): the drain was CPU-bound, so more replicas "
            "only contended for the same 2 cores"
        )
    if max(publish.values()) > 5:
        problems.append(
            f"publishing the burst took {min(publish.values()):.0f}-{max(publish.values()):.0f} s "
            "(2-3 s on a quiet machine)"
        )
    return problems


def render(result: Result) -> str:
    problems = validity(result)
    lines = []
    if problems:
        lines += [
            "**This run does not support the comparison, and the goals cannot be judged from "
            "it:** " + "; ".join(problems) + ". The ratios below are printed as measured; re-run "
            "`python -m bench burst_drain` on a quiet machine.",
            "",
        ]
    lines += [
        "| Policy | Drain (s) | Drain / oracle | Peak replicas | Replica-s (drain) / oracle "
        "| Replica-s (horizon) / oracle | of which warm (s) | Host CPU (%) "
        "| Latency p50 / p95 (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def r(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for name in ORDER:
        s = result.summary.get(name)
        if s is None:
            continue
        star = "*" if s.get("extrapolated") else ""
        lines.append(
            f"| {name} | {s['drain_s']:.1f}{star} | {r(s['drain_ratio'])}{star} | "
            f"{s['peak_replicas']} | {r(s['rs_drain_ratio'])}{star} | "
            f"{r(s['rs_horizon_ratio'])}{star} | {r(s.get('warm_s_horizon'), 0)} | "
            f"{r(s.get('host_cpu_mean'), 0)} | "
            f"{s['latency_p50_s']:.1f} / {s['latency_p95_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ORDER if n in result.samples]
    fig, axes = plt.subplots(len(names), 4, figsize=(13, 2.1 * len(names)), sharex=True,
                             squeeze=False)  # fmt: skip
    for row, name in enumerate(names):
        data = result.samples[name]
        t = [s[0] for s in data["samples"]]
        axes[row][0].plot(t, [s[1] for s in data["samples"]], color="tab:blue")
        axes[row][1].step(t, [s[2] for s in data["samples"]], where="post", color="tab:green")
        axes[row][2].scatter([x[0] for x in data["latency"]], [x[1] for x in data["latency"]],
                             s=2, color="tab:red")  # fmt: skip
        axes[row][3].plot(t, [s[4] if len(s) > 4 else 0 for s in data["samples"]],
                          color="tab:grey")  # fmt: skip
        axes[row][1].set_ylim(0, MAX_REPLICAS + 0.5)
        axes[row][3].set_ylim(0, 100)
        axes[row][0].set_ylabel(name, fontsize=9)
        if t and data["drain_s"] <= t[-1]:
            for ax in axes[row]:
                ax.axvline(data["drain_s"], color="grey", linestyle=":", linewidth=1)
    titles = ("queue depth", "worker-io replicas", "latency (s) by start", "host CPU (%)")
    for col, title in enumerate(titles):
        axes[0][col].set_title(title, fontsize=10)
        axes[-1][col].set_xlabel("seconds since the burst was enqueued")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "burst_drain.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
