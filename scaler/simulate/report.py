"""What a run means in numbers, and the files ``scaler simulate --out DIR`` writes.

Figures per policy and service, defined so that they match bench/burst_drain.py where it has one:

- **drain_s**: from the first arrival on the service's queues to its last task's completion (per
  policy: from the trace's first arrival to the last completion anywhere); None while tasks remain
  unfinished at the horizon (``unfinished`` says how many).
- **latency p50/p95/p99**: start minus publish (bench 2's latency); **completion_p95**: end minus
  publish. Percentiles interpolate linearly between ranks, as bench/stats.py does.
- **replica_seconds**: the integral of the replicas over the run, starting and draining ones
  included (they cost a container) up to the horizon, which is the same for every policy of one
  ``scaler simulate`` call.
- **warm_seconds**: the same integral for warm-pool replicas (booting, waiting, being stopped):
  they cost memory, not serving capacity, so they are counted apart;
- **scale_actions**: replica changes carried out; **reversals**: a change in the other direction
  than the one before (up after down, down after up): churn; **peak_replicas**: the most serving
  replicas at any time.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scaler.simulate.engine import SimResult

__all__ = ["percentile", "render_table", "summarise", "write_outputs", "write_plot"]

PLOT_INSTALL = (
    "pip install 'celery-autoscale-stack[simulate]' (or .venv/bin/pip install matplotlib)"
)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100), linear between ranks; None for no values."""
    if not values:
        return None
    ordered = values if _is_sorted(values) else sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _is_sorted(values: Sequence[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def _reversals(directions: Sequence[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(directions) if a != b)


def summarise(result: SimResult) -> dict[str, Any]:
    """Per service and in total, the figures the module docstring defines (JSON-ready)."""
    services: dict[str, Any] = {}
    all_lat: list[float] = []
    all_comp: list[float] = []
    first_any: float | None = None
    last_any: float | None = None
    unfinished_any = 0
    for name in result.policy.services:
        logs = result.service_tasks(name)
        lat = sorted(x for log in logs for x in log.latencies())  # sorted once, not per figure
        comp = sorted(x for log in logs for x in log.completions())
        published = sum(len(log.publish) for log in logs)
        done = len(comp)
        firsts = [log.publish[0] for log in logs if len(log.publish)]
        ends = [e for log in logs for e in log.end if e == e]
        first = min(firsts) if firsts else None
        last = max(ends) if ends else None
        unfinished = published - done
        drain = None if first is None or last is None or unfinished else last - first
        changes = [a for a in result.actions if a.service == name]
        directions = [1 if a.after > a.before else -1 for a in changes]
        services[name] = {
            "tasks": published,
            "completed": done,
            "unfinished": unfinished,
            "drain_s": drain,
            "latency_p50_s": percentile(lat, 50),
            "latency_p95_s": percentile(lat, 95),
            "latency_p99_s": percentile(lat, 99),
            "completion_p95_s": percentile(comp, 95),
            "replica_seconds": result.replica_seconds[name],
            "warm_seconds": result.warm_seconds[name],
            "scale_actions": len(changes),
            "scale_ups": directions.count(1),
            "scale_downs": directions.count(-1),
            "reversals": _reversals(directions),
            "peak_replicas": result.peak_replicas[name],
        }
        all_lat += lat
        all_comp += comp
        unfinished_any += unfinished
        if first is not None:
            first_any = first if first_any is None else min(first_any, first)
        if last is not None:
            last_any = last if last_any is None else max(last_any, last)
    all_lat.sort()
    all_comp.sort()
    per = services.values()
    total = {
        "tasks": sum(s["tasks"] for s in per),
        "completed": sum(s["completed"] for s in per),
        "unfinished": unfinished_any,
        "drain_s": None
        if first_any is None or last_any is None or unfinished_any
        else last_any - first_any,
        "latency_p50_s": percentile(all_lat, 50),
        "latency_p95_s": percentile(all_lat, 95),
        "latency_p99_s": percentile(all_lat, 99),
        "completion_p95_s": percentile(all_comp, 95),
        "replica_seconds": sum(s["replica_seconds"] for s in per),
        "warm_seconds": sum(s["warm_seconds"] for s in per),
        "scale_actions": sum(s["scale_actions"] for s in per),
        "reversals": sum(s["reversals"] for s in per),
        "peak_replicas": sum(s["peak_replicas"] for s in per),  # sum of per-service peaks
    }
    return {
        "seed": result.seed,
        "horizon_s": result.horizon_s,
        "trace_duration_s": result.trace_duration_s,
        "cycles": result.cycles,
        "woken_cycles": int(result.stats.get("woken_cycles", 0)),
        "interval_s": result.policy.interval_s,
        "services": services,
        "total": total,
    }


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_table(label: str, summary: Mapping[str, Any]) -> str:
    """One policy's figures as a fixed-width table, a row per service and a total."""
    head = (
        f"{'SERVICE':<18} {'TASKS':>7} {'DRAIN(s)':>9} {'LAT p50':>8} {'p95':>8} {'p99':>8} "
        f"{'DONE p95':>9} {'REPLICA-s':>10} {'WARM-s':>7} {'ACTIONS':>7} {'REVERSALS':>9} "
        f"{'PEAK':>4}"
    )
    lines = [
        f"policy {label}: horizon {summary['horizon_s']:.0f} s, {summary['cycles']} cycles of "
        f"{summary['interval_s']:g} s ({summary.get('woken_cycles', 0)} woken by events), seed "
        f"{summary['seed']}",
        head,
    ]
    rows = [*summary["services"].items(), ("total", summary["total"])]
    for name, s in rows:
        drain = _fmt(s["drain_s"])
        if s["unfinished"]:
            drain = f"{s['unfinished']} left"
        lines.append(
            f"{name:<18} {s['tasks']:>7} {drain:>9} {_fmt(s['latency_p50_s'], 2):>8} "
            f"{_fmt(s['latency_p95_s'], 2):>8} {_fmt(s['latency_p99_s'], 2):>8} "
            f"{_fmt(s['completion_p95_s'], 2):>9} {s['replica_seconds']:>10.0f} "
            f"{s.get('warm_seconds', 0.0):>7.0f} {s['scale_actions']:>7} {s['reversals']:>9} "
            f"{s['peak_replicas']:>4}"
        )
    return "\n".join(lines)


def write_steps_csv(path: Path, results: Mapping[str, SimResult]) -> None:
    """t, policy, service, replicas, waiting, in_flight, oldest_age, warm: one row per cycle
    and service, policies one after the other."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["t", "policy", "service", "replicas", "waiting", "in_flight", "oldest_age", "warm"]
        )
        for label, r in results.items():
            for s in r.steps:
                age = "" if s.oldest_age is None else f"{s.oldest_age:.3f}"
                w.writerow(
                    [f"{s.t:g}", label, s.service, s.replicas, s.waiting, s.in_flight, age, s.warm]
                )


def replica_series(r: SimResult) -> dict[str, tuple[list[float], list[int]]]:
    """Per service, the serving replicas as the backend changed them (at each action, not at
    the next cycle's observation, which would draw every change one interval late)."""
    series: dict[str, tuple[list[float], list[int]]] = {}
    for s in r.steps:
        if s.service not in series:
            series[s.service] = ([s.t], [s.replicas])
    for a in r.actions:
        t, reps = series[a.service]
        t.append(a.t)
        reps.append(a.after)
    for t, reps in series.values():
        t.append(r.horizon_s)
        reps.append(reps[-1])
    return series


def waiting_series(r: SimResult, points: int = 2000) -> dict[str, tuple[list[float], list[int]]]:
    """Per service, tasks published but not started, on an even grid of about ``points`` (at
    least one a second), counted from the tasks themselves rather than sampled at the cycles."""
    step = max(1.0, r.horizon_s / points)
    grid = [i * step for i in range(int(r.horizon_s / step) + 1)]
    series: dict[str, tuple[list[float], list[int]]] = {}
    for log in r.tasks.values():
        publish, start = list(log.publish), list(log.start)
        _, wait = series.setdefault(log.service, (grid, [0] * len(grid)))
        for i, t in enumerate(grid):
            wait[i] += bisect.bisect_right(publish, t) - bisect.bisect_right(start, t)
    return series


def write_plot(path: Path, results: Mapping[str, SimResult]) -> None:
    """Replicas (top) and waiting tasks (bottom) over time per service, one column per policy,
    shared axes so the columns compare at a glance. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, axes = plt.subplots(
        2,
        len(labels),
        figsize=(4.5 * len(labels) + 1, 6),
        sharex=True,
        sharey="row",
        squeeze=False,
    )
    hours = max(r.horizon_s for r in results.values()) > 3 * 3600
    scale, unit = (3600.0, "hours") if hours else (1.0, "seconds")
    for col, label in enumerate(labels):
        r = results[label]
        for service, (t, reps) in replica_series(r).items():
            axes[0][col].step([x / scale for x in t], reps, where="post", label=service, lw=1)
        for service, (t, wait) in waiting_series(r).items():
            axes[1][col].plot([x / scale for x in t], wait, label=service, linewidth=1)
        axes[0][col].set_title(label, fontsize=10)
        axes[1][col].set_xlabel(f"{unit} from the trace's start")
    axes[0][0].set_ylabel("replicas (serving)")
    axes[1][0].set_ylabel("tasks waiting")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out: Path, results: Mapping[str, SimResult], summaries: Mapping[str, Any]
) -> list[str]:
    """summary.json, steps.csv and plot.png in ``out``; returns notes (a skipped plot)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps({"policies": summaries}, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    write_steps_csv(out / "steps.csv", results)
    try:
        write_plot(out / "plot.png", results)
    except ImportError:
        return [f"plot.png skipped: matplotlib is not installed ({PLOT_INSTALL})"]
    return []
