"""Policy comparison in simulation: four policies on four standard traces, against the oracle.

The simulator (``scaler.simulate``: the real decision core in a closed loop around modelled
workers) replays the shipped traces in scaler/simulate/traces/: **burst** (600 io tasks at once
after a quiet minute, on the stack's own worker model), **bursts-idle** (io bursts with idle
gaps shorter and longer than the default 30 s down window, plus two default-queue bursts; worker-io
at 4 threads as benchmark 2 runs it), **diurnal** (a day across the five queues, about 360,000
tasks, with two io floods) and **trickle** (a few tasks a minute on every queue for an hour).
Each runs under four policies over all five services: **default** (compose/scaler-policy.yaml),
**oracle** (scaler/simulate/policies/oracle.yaml: every service at its maximum from the start),
**keda-like** and **cpu-threshold** (the seed's intent), both from scaler/simulate/policies/.
The simulated scalers' cycles all start at 0, so a burst at a multiple of 30 s (burst.yaml's is
at 60 s) would land exactly on a 30 s policy's cycle, a phase no real scaler has: each seed
moves every burst of a trace later by a random phase of 0-30 s (the same for all four policies).

Per trace and seed all four policies are charged over the same horizon, the longest any of them
needs to come back to its floor after the last task (as ``scaler simulate`` does; a policy
that settled earlier keeps the replicas it ended with until then). The figures are the p95 of
every task's latency (start minus publish, all queues together) and the replica-seconds of every
service over that whole horizon, each as a ratio to the oracle's on the same seed; the tables
give medians over 5 seeds (task durations, start-up times and random arrivals change with the
seed). The goal for the default policy: p95 within 1.2x the oracle's at no more than half its
replica-seconds. Where it falls short, the notes say which decision step held replicas or delayed
a scale-up, read from the default policy's own decisions on the median seed: every cycle where a
service's raw recommendation was above its count with work waiting and a pacing rule (cooldown,
step limit, bound, host guard) kept it lower, and every cycle where the recommendation was below
the count and a rule (down window, cooldown, step limit) kept the replicas, charged at
(count - recommendation) x the cycle.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

from bench.context import Context
from bench.result import Result

NAME = "policy_comparison"
TITLE = "Policy comparison in simulation: four traces, four policies, against the oracle"
TRACES = {
    "burst": "scaler/simulate/traces/burst.yaml",
    "bursts-idle": "scaler/simulate/traces/bursts-idle.yaml",
    "diurnal": "scaler/simulate/traces/diurnal.yaml",
    "trickle": "scaler/simulate/traces/trickle.yaml",
}
POLICIES = {
    "default": "compose/scaler-policy.yaml",
    "oracle": "scaler/simulate/policies/oracle.yaml",
    "keda-like": "scaler/simulate/policies/keda-like.yaml",
    "cpu-threshold": "scaler/simulate/policies/cpu-threshold.yaml",
}
SEEDS = (1, 2, 3, 4, 5)
QUICK_SEEDS = (1,)
GOALS = {"latency_p95": 1.2, "replica_seconds": 0.5}
# Reasons (numbers removed) that delay a scale-up or hold replicas, as decide() words them.
UP_RULES = ("scale-up cooldown", "step limit +", "no scale-up", "up window")
DOWN_RULES = ("down window", "scale-down cooldown", "step limit -", "quiet period",
              "no scale-down")  # fmt: skip


def _rule(reason: str) -> str:
    """decide()'s reason without its numbers: the rule that gave it."""
    if reason.startswith("host "):
        return "host guard (" + re.sub(r"\s*\d+(\.\d+)?%", "", reason).split(":")[0].strip() + ")"
    text = re.sub(r"\d+(\.\d+)?", "N", reason)
    return re.split(r":| ->", text, maxsplit=1)[0].strip()


def attribution(result: Any) -> dict[str, Any]:
    """Per service of one run: cycles whose scale-up a pacing rule delayed while work waited,
    and replica-seconds a rule held above the recommendation, by rule (decide()'s own words)."""
    policy = result.policy
    interval = policy.interval_s
    up: dict[str, Counter[str]] = defaultdict(Counter)
    held: dict[str, Counter[str]] = defaultdict(Counter)
    for step, d in zip(result.steps, result.decisions, strict=True):
        if d.current is None or d.desired is None or d.recommended is None:
            continue
        sp = policy.services[d.service]
        rec = min(max(d.recommended, sp.min_replicas), sp.max_replicas)
        reasons = [_rule(r) for r in d.reasons]
        if rec > d.desired and step.waiting > 0:
            for rule in reasons:
                if rule.startswith(UP_RULES) or "host" in rule:
                    up[d.service][rule] += 1
        elif rec < d.current and d.desired > rec:
            for rule in reasons:
                if rule.startswith(DOWN_RULES) or "idle" in rule:
                    held[d.service][rule] += (d.current - rec) * interval
    first: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for a in result.actions:
        if len(first[a.service]) < 4:
            first[a.service].append((a.t, a.before, a.after))
    return {"up_delayed_cycles": {s: dict(c) for s, c in up.items()},
            "held_replica_s": {s: dict(c) for s, c in held.items()},
            "first_actions": dict(first)}  # fmt: skip


PHASE_S = 30.0  # the slowest policy's cycle: bursts move by a random fraction of it


def shifted_trace(root: Path, label: str, seed: int) -> tuple[Any, float]:
    """The trace with every burst moved later by a seed's random phase in [0, PHASE_S): the
    simulated scalers' cycles all start at 0, so a burst at a multiple of 30 s would land exactly
    on a 30 s policy's cycle, which a real scaler at a random phase never has."""
    import random

    import yaml

    from scaler.simulate.trace import parse_trace_data

    data = yaml.safe_load((root / TRACES[label]).read_text())
    phase = random.Random(f"phase:{seed}").uniform(0.0, PHASE_S)
    for gen in data["load"]:
        if gen.get("kind") == "burst":
            gen["at"] = float(gen["at"]) + phase
    if data.get("duration_s") is not None:
        data["duration_s"] = float(data["duration_s"]) + phase
    return parse_trace_data(data, TRACES[label]), phase


def containers_over_time(lives: list[Any], horizon: float) -> list[tuple[float, int]]:
    """Containers in existence (starting, ready, draining) over time, all services: exact from
    each replica's life, where the cycles' observations lag a change by one cycle."""
    events: list[tuple[float, int]] = [(life.created, 1) for life in lives]
    events += [(life.gone, -1) for life in lives if life.gone is not None]
    events.sort()
    points: list[tuple[float, int]] = []
    count = 0
    for t, delta in events:
        count += delta
        if points and points[-1][0] == t:
            points[-1] = (t, count)
        else:
            points.append((t, count))
    points.append((horizon, count))
    return points


def run_trace(ctx: Context, label: str, seeds: tuple[int, ...]) -> dict[str, Any]:
    from scaler.policy import load_policy
    from scaler.simulate import build_model, simulate, summarise

    trace, _ = shifted_trace(ctx.root, label, seeds[0])
    policies = {name: load_policy(ctx.root / path, env={}) for name, path in POLICIES.items()}
    models = {name: build_model(p, trace.model) for name, p in policies.items()}
    per_seed: list[dict[str, Any]] = []
    series: dict[str, list[tuple[float, int]]] = {}
    for seed in seeds:
        trace, phase = shifted_trace(ctx.root, label, seed)
        runs = {}
        for name, policy in policies.items():
            keep: Literal["all", "none"] = "all" if name == "default" else "none"
            runs[name] = simulate(policy, trace, models[name], seed=seed, decisions=keep)
        horizon = max(r.horizon_s for r in runs.values())
        row: dict[str, Any] = {"seed": seed, "phase_s": phase, "horizon_s": horizon,
                               "policies": {}}  # fmt: skip
        for name, r in runs.items():
            summ = summarise(r)
            alive = sum(1 for life in r.replicas if life.gone is None)
            rs = summ["total"]["replica_seconds"] + alive * (horizon - r.horizon_s)
            row["policies"][name] = {
                "latency_p95_s": summ["total"]["latency_p95_s"],
                "latency_p99_s": summ["total"]["latency_p99_s"],
                "replica_seconds": rs,
                "unfinished": summ["total"]["unfinished"],
                "scale_actions": summ["total"]["scale_actions"],
                "per_service_p95": {s: v["latency_p95_s"] for s, v in summ["services"].items()},
                "per_service_p99": {s: v["latency_p99_s"] for s, v in summ["services"].items()},
                "per_service_rs": {s: v["replica_seconds"] for s, v in summ["services"].items()},
            }
            if seed == seeds[0]:
                series[name] = containers_over_time(r.replicas, horizon)
        row["attribution"] = attribution(runs["default"])
        per_seed.append(row)
        ctx.log(f"policy comparison: {label} seed {seed}: " + ", ".join(
            f"{n} p95 {p['latency_p95_s']:.2f} s rs {p['replica_seconds']:.0f}"
            for n, p in row["policies"].items()))  # fmt: skip
        del runs
    startup = {name: svc.startup_s.mean() for name, svc in models["default"].services.items()}
    return {"per_seed": per_seed, "series": series, "duration_s": trace.duration_s,
            "startup_mean_s": startup}  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def summarise_trace(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = data["per_seed"]
    for name in POLICIES:
        p95 = [r["policies"][name]["latency_p95_s"] for r in rows]
        rs = [r["policies"][name]["replica_seconds"] for r in rows]
        out[name] = {
            "latency_p95_s": _median(p95),
            "latency_p99_s": _median([r["policies"][name]["latency_p99_s"] for r in rows]),
            "p99_ratio": _median([_ratio(r["policies"][name]["latency_p99_s"],
                                         r["policies"]["oracle"]["latency_p99_s"])
                                  for r in rows]),
            "replica_seconds": _median(rs),
            "p95_ratio": _median([_ratio(r["policies"][name]["latency_p95_s"],
                                         r["policies"]["oracle"]["latency_p95_s"])
                                  for r in rows]),
            "rs_ratio": _median([_ratio(r["policies"][name]["replica_seconds"],
                                        r["policies"]["oracle"]["replica_seconds"])
                                 for r in rows]),
            "scale_actions": _median([r["policies"][name]["scale_actions"] for r in rows]),
            "unfinished": max(r["policies"][name]["unfinished"] for r in rows),
        }  # fmt: skip
    return out


def run(ctx: Context) -> Result:
    started_at, t0 = time.time(), time.monotonic()
    seeds = QUICK_SEEDS if ctx.quick else SEEDS
    samples: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for label in TRACES:
        data = run_trace(ctx, label, seeds)
        samples[label] = data
        summary[label] = summarise_trace(data)
    result = Result(
        name=NAME, title=TITLE, started_at=started_at, duration_s=time.monotonic() - t0,
        settings={"traces": TRACES, "policies": POLICIES, "seeds": list(seeds),
                  "burst phase": f"every burst moved later by U(0, {PHASE_S:g}) s per seed",
                  "model": "the simulator's defaults (scaler/simulate/model.py) with each "
                           "trace's model: section",
                  "goal (default policy)": f"latency p95 <= {GOALS['latency_p95']}x the "
                                           f"oracle's, replica-seconds <= "
                                           f"{GOALS['replica_seconds']}x the oracle's"},
        samples=samples, summary=summary,
    )  # fmt: skip
    result.notes = goal_notes(result)
    return result


def _median_seed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def key(r: dict[str, Any]) -> float:
        return _ratio(r["policies"]["default"]["replica_seconds"],
                      r["policies"]["oracle"]["replica_seconds"]) or 0.0  # fmt: skip

    return sorted(rows, key=key)[len(rows) // 2]


def _top(counter: dict[str, float], n: int = 2) -> str:
    items = sorted(counter.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{rule} {value:.0f}" for rule, value in items)


def why_latency(data: dict[str, Any], pct: str = "p95") -> str:
    row = _median_seed(data["per_seed"])
    d, o = row["policies"]["default"], row["policies"]["oracle"]
    key = f"per_service_{pct}"
    worst = max(d[key], key=lambda s: (d[key][s] or 0) - (o[key][s] or 0))
    text = (
        f"the tail is {worst}'s: {pct} {d[key][worst] or 0:.2f} s against the "
        f"oracle's {o[key][worst] or 0:.2f} s (seed {row['seed']})"
    )
    acts = row["attribution"].get("first_actions", {}).get(worst, [])
    if acts:
        changes = ", ".join(f"{b}->{a} at {t:.0f} s" for t, b, a in acts)
        startup = data["startup_mean_s"][worst]
        text += (
            f"; its first replica changes: {changes} (a new replica consumes after its "
            f"start-up, {startup:.1f} s on average in the model)"
        )
    delayed = row["attribution"]["up_delayed_cycles"].get(worst, {})
    if delayed:
        text += (
            f"; with {worst}'s tasks waiting, scale-ups were held back in cycles by "
            f"{_top(delayed, 3)}"
        )
    else:
        text += (
            f"; no pacing rule held back a scale-up of {worst} while work waited: the "
            "wait is the reaction itself (one cycle to see the backlog, the new replicas' "
            "start-up) and the replicas the target asks for (fewer than the oracle's "
            "maximum, since the target tracks tasks per replica, not latency)"
        )
    return text


def why_cost(data: dict[str, Any]) -> str:
    row = _median_seed(data["per_seed"])
    d, o = row["policies"]["default"], row["policies"]["oracle"]
    parts = []
    for svc in sorted(d["per_service_rs"], key=lambda s: -d["per_service_rs"][s]):
        share = _ratio(d["per_service_rs"][svc], o["per_service_rs"][svc])
        parts.append(f"{svc} {share:.2f}x" if share is not None else svc)
    held = row["attribution"]["held_replica_s"]
    total_held: Counter[str] = Counter()
    for per in held.values():
        total_held.update(per)
    text = f"replica-seconds per service against the oracle's: {', '.join(parts)}"
    if total_held:
        text += (
            f"; replicas kept above the recommendation, in replica-seconds by rule: "
            f"{_top(dict(total_held), 3)} (of {d['replica_seconds']:.0f} in all)"
        )
    return text


def goal_notes(result: Result) -> list[str]:
    notes = []
    for label, summ in result.summary.items():
        d = summ["default"]
        o = summ["oracle"]
        lat_ok = (d["p95_ratio"] is not None and d["p95_ratio"] <= GOALS["latency_p95"]) or (
            d["p95_ratio"] is None and (d["latency_p95_s"] or 0) <= (o["latency_p95_s"] or 0)
        )
        rs_ok = d["rs_ratio"] is not None and d["rs_ratio"] <= GOALS["replica_seconds"]
        lat = (f"{d['p95_ratio']:.2f}x" if d["p95_ratio"] is not None else
               f"{d['latency_p95_s'] or 0:.2f} s against the oracle's "
               f"{o['latency_p95_s'] or 0:.2f} s (no ratio: the oracle's is 0; p99 "
               + (f"{d['p99_ratio']:.2f}x the oracle's" if d.get("p99_ratio") is not None
                  else f"{d['latency_p99_s'] or 0:.2f} s against the oracle's "
                       f"{o['latency_p99_s'] or 0:.2f} s") + ")")  # fmt: skip
        text = (
            f"**{label}**: default p95 {lat} ({'met' if lat_ok else 'missed'}), "
            f"replica-seconds {d['rs_ratio']:.2f}x ({'met' if rs_ok else 'missed'})"
        )
        why = []
        if not lat_ok:
            why.append("latency: " + why_latency(result.samples[label]))
        if not rs_ok:
            why.append("cost: " + why_cost(result.samples[label]))
        if (
            lat_ok
            and d["p95_ratio"] is None
            and (d["latency_p99_s"] or 0) > 1.2 * (o["latency_p99_s"] or 0)
        ):
            why.append("the p99 behind the met p95: " + why_latency(result.samples[label], "p99"))
        lead = ". Why: " if not (lat_ok and rs_ok) else ". Beyond the goal, "
        notes.append(text + (lead + "; ".join(why) + "." if why else "."))
        for name, s in summ.items():
            if s["unfinished"]:
                notes.append(f"{label}: {name} left {s['unfinished']} tasks unfinished at the "
                             "horizon (their latency is not in its p95).")  # fmt: skip
    return notes


def render(result: Result) -> str:
    lines = [
        "| Trace | Policy | Latency p95 (s) | p95 / oracle | Replica-s (whole trace) "
        "| Replica-s / oracle | Latency p99 (s) | p99 / oracle | Scale actions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def r(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    for label, summ in result.summary.items():
        for name in POLICIES:
            s = summ[name]
            bold = "**" if name == "default" else ""
            lines.append(
                f"| {label} | {bold}{name}{bold} | {r(s['latency_p95_s'])} | "
                f"{r(s['p95_ratio'])} | {r(s['replica_seconds'], ',.0f')} | "
                f"{r(s['rs_ratio'])} | {r(s.get('latency_p99_s'))} | {r(s.get('p99_ratio'))} | "
                f"{r(s['scale_actions'], '.0f')} |"
            )
    lines += ["", f"Medians over seeds {', '.join(map(str, result.settings['seeds']))}; ratios "
              "are medians of each seed's ratio; latency is over every task of the trace, all "
              "queues together (p99 shown because on the diurnal day and the trickle fewer than "
              "5 % of the tasks wait at all, so every policy's p95 is 0). A ratio is - where "
              "the oracle's figure is 0."]  # fmt: skip
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result.samples)
    fig, axes = plt.subplots(len(labels), 1, figsize=(11, 2.6 * len(labels)), squeeze=False)
    colours = {"default": "tab:blue", "oracle": "tab:grey", "keda-like": "tab:orange",
               "cpu-threshold": "tab:red"}  # fmt: skip
    for row, label in enumerate(labels):
        ax = axes[row][0]
        data = result.samples[label]
        hours = data["duration_s"] > 3 * 3600
        scale = 3600.0 if hours else 1.0
        for name in POLICIES:
            pts = data["series"].get(name, [])
            ax.step([p[0] / scale for p in pts], [p[1] for p in pts], where="post",
                    label=name, color=colours[name], linewidth=1,
                    linestyle="--" if name == "oracle" else "-")  # fmt: skip
        ax.set_title(f"{label} (seed {result.settings['seeds'][0]})", fontsize=10)
        ax.set_ylabel("containers, all services", fontsize=8)
        ax.set_xlabel("hours" if hours else "seconds", fontsize=8)
    axes[0][0].legend(fontsize=8, loc="upper right", ncol=4)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "policy_comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
