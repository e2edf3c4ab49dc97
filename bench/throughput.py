"""Benchmark 4: tasks per second on tiny tasks, the project's delivery settings against Celery's.

Per pool type (prefork -c 2, threads -c 8, solo), a real worker process
(``celery -A bench.throughput_app worker``) drains a queue filled beforehand with N tiny tasks
on the local Redis (keys under this run's own prefix). The tasks themselves record when the first
one started and the last one ended, so worker start-up is not counted and no polling resolution
enters the figure: rate = (N - 1) / (last - first). Profiles rotate order from run to run, so
none always runs on a warmer machine; the report gives medians over the runs and the ratio
project / default. A third profile, "project-untracked", is the project's without the record of
who holds each unacked message (services.ownership, issue 12): the ratio tracked / untracked,
side by side in the same runs, is that record's cost on the hot path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import redis

from bench.context import Context
from bench.polling import BenchTimeout, poll_until
from bench.result import Result
from bench.stats import median, ratio
from bench.throughput_app import PROFILES, make_app

NAME = "throughput"
TITLE = "Worker throughput on tiny tasks (benchmark 4)"
POOLS: tuple[tuple[str, int], ...] = (("prefork", 2), ("threads", 8), ("solo", 1))
PROFILE_ORDER = ("default", "project", "project-untracked")
DRAIN_TIMEOUT_S = 120.0


def _publish(ctx: Context, queue: str, counter: str, total: int) -> None:
    """Fill ``queue`` with ``total`` tick tasks over one producer connection."""
    client = make_app(ctx.redis_url, ctx.key_prefix, "project")
    try:
        with client.producer_or_acquire() as producer:
            for _ in range(total):
                client.send_task("bench.tick", args=(counter, total), queue=queue,
                                 producer=producer)  # fmt: skip
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), then kill if the worker does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _one_run(
    ctx: Context, r: redis.Redis, pool: str, concurrency: int, profile: str, total: int, tag: str
) -> dict[str, Any]:
    """Fill a fresh queue, start one worker on it, return the measured rate."""
    queue = f"tp-{tag}"
    counter = f"{ctx.key_prefix}{queue}:done"
    _publish(ctx, queue, counter, total)
    env = {
        **os.environ,
        "BENCH_BROKER_URL": ctx.redis_url,
        "BENCH_KEY_PREFIX": ctx.key_prefix,
        "BENCH_PROFILE": profile,
    }
    cmd = [sys.executable, "-m", "celery", "-A", "bench.throughput_app", "worker",
           "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", f"bench-{tag}@%h",
           "-l", "warning", "--without-gossip", "--without-mingle"]  # fmt: skip
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(cmd, cwd=ctx.root, env=env, stdout=output, stderr=output)
        try:

            def finished() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}")
                return r.exists(f"{counter}:last") == 1

            try:
                poll_until(finished, f"{total} tasks done by {pool} ({profile})",
                           DRAIN_TIMEOUT_S, every_s=0.05)  # fmt: skip
            except (BenchTimeout, RuntimeError) as exc:
                output.seek(0)
                tail = output.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{exc}; worker output:\n{tail}") from exc
        finally:
            _stop(proc)
    first = _read_number(r, f"{counter}:first")
    last = _read_number(r, f"{counter}:last")
    done = int(_read_number(r, counter))
    return {
        "pool": pool,
        "concurrency": concurrency,
        "profile": profile,
        "tasks": total,
        "done": done,
        "seconds": last - first,
        "tasks_per_s": (total - 1) / (last - first) if last > first else None,
    }


def _read_number(r: redis.Redis, key: str) -> float:
    """A number the tasks stored (0 when the key is absent)."""
    value = cast(bytes | None, r.get(key))
    return float(value) if value is not None else 0.0


def _cleanup(r: redis.Redis, prefix: str) -> int:
    """Delete every key of this run's prefix (only ours: the shared server is never flushed)."""
    removed = 0
    for key in r.scan_iter(match=f"{prefix}*", count=500):
        removed += cast(int, r.delete(key))
    return removed


def run(ctx: Context) -> Result:
    started, t0 = time.time(), time.monotonic()
    runs, total = (1, 300) if ctx.quick else (3, 2000)
    r = redis.Redis.from_url(ctx.redis_url)
    rows: list[dict[str, Any]] = []
    try:
        for i in range(runs):
            for pool, concurrency in POOLS:
                shift = (i + POOLS.index((pool, concurrency))) % len(PROFILE_ORDER)
                order = PROFILE_ORDER[shift:] + PROFILE_ORDER[:shift]
                for profile in order:
                    row = _one_run(ctx, r, pool, concurrency, profile, total,
                                   f"{i}-{pool}-{profile}")  # fmt: skip
                    row["run"] = i
                    rows.append(row)
                    ctx.log(f"throughput: run {i} {pool} -c {concurrency} {profile}: "
                            f"{row['tasks_per_s']:.0f} tasks/s")  # fmt: skip
    finally:
        _cleanup(r, ctx.key_prefix)
        r.close()
    notes: list[str] = []
    lost = [row for row in rows if row["done"] != row["tasks"]]
    if lost:
        notes.append(f"{len(lost)} run(s) did not count every task once: {lost}")
    table = []
    for pool, concurrency in POOLS:
        rates = {
            p: [row["tasks_per_s"] for row in rows if row["pool"] == pool and row["profile"] == p
                and row["tasks_per_s"]]
            for p in PROFILE_ORDER
        }  # fmt: skip
        per_run = _per_run_ratios(rows, pool, "project", "default")
        tracking = _per_run_ratios(rows, pool, "project", "project-untracked")
        table.append(
            {
                "pool": pool,
                "concurrency": concurrency,
                "default_median": median(rates["default"]),
                "default_range": [min(rates["default"]), max(rates["default"])],
                "project_median": median(rates["project"]),
                "project_range": [min(rates["project"]), max(rates["project"])],
                "ratio_of_medians": ratio(median(rates["project"]), median(rates["default"])),
                "ratio_per_run_median": median([x for x in per_run if x is not None]),
                "untracked_median": median(rates["project-untracked"]),
                "untracked_range": [
                    min(rates["project-untracked"]),
                    max(rates["project-untracked"]),
                ],
                "tracking_ratio_of_medians": ratio(
                    median(rates["project"]), median(rates["project-untracked"])
                ),
                "tracking_ratio_per_run_median": median([x for x in tracking if x is not None]),
            }
        )
    return Result(
        name=NAME,
        title=TITLE,
        started_at=started,
        duration_s=time.monotonic() - t0,
        settings={
            "tasks_per_run": total,
            "runs": runs,
            "pools": [f"{p} -c {c}" for p, c in POOLS],
            "project_profile": PROFILES["project"],
            "project_untracked_profile": PROFILES["project-untracked"],
            "default_profile": "Celery defaults (task_acks_late False, prefetch multiplier 4)",
            "broker": "local Redis on loopback, project's priority layout (10 lists per queue)",
            "task": "bench.tick: one INCR on Redis (two SETs for the first and last), no result",
            "worker_flags": "--without-gossip --without-mingle, log level warning",
        },
        samples={"runs": rows},
        summary={"pools": table},
        notes=notes,
    )


def _per_run_ratios(rows: list[dict[str, Any]], pool: str, a: str, b: str) -> list[float | None]:
    """Profile ``a``'s rate over ``b``'s, per run of ``pool`` (the two measured side by side)."""
    return [
        ratio(x["tasks_per_s"], y["tasks_per_s"])
        for x in rows
        for y in rows
        if x["pool"] == y["pool"] == pool and x["run"] == y["run"]
        and x["profile"] == a and y["profile"] == b
    ]  # fmt: skip


def render(result: Result) -> str:
    lines = [
        "| pool | default: tasks/s median (range) | project: tasks/s median (range) "
        "| project / default (of medians) | per-run ratio, median |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result.summary["pools"]:
        d_lo, d_hi = row["default_range"]
        p_lo, p_hi = row["project_range"]
        lines.append(
            f"| {row['pool']} -c {row['concurrency']} | {row['default_median']:.0f} "
            f"({d_lo:.0f}-{d_hi:.0f}) | {row['project_median']:.0f} ({p_lo:.0f}-{p_hi:.0f}) "
            f"| {row['ratio_of_medians']:.2f} | {row['ratio_per_run_median']:.2f} |"
        )
    if all("untracked_median" in row for row in result.summary["pools"]):
        lines += [
            "",
            "The cost of recording who holds each unacked message (`services.ownership`, the "
            "owner tracking a dead worker's restore needs; issue 12): the project profile with it "
            "(as shipped) and without it, measured in the same runs, order rotating.",
            "",
            "| pool | project without owner tracking: tasks/s median (range) "
            "| project (with it): tasks/s median | tracked / untracked (of medians) "
            "| per-run ratio, median |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in result.summary["pools"]:
            u_lo, u_hi = row["untracked_range"]
            lines.append(
                f"| {row['pool']} -c {row['concurrency']} | {row['untracked_median']:.0f} "
                f"({u_lo:.0f}-{u_hi:.0f}) | {row['project_median']:.0f} "
                f"| {row['tracking_ratio_of_medians']:.3f} "
                f"| {row['tracking_ratio_per_run_median']:.3f} |"
            )
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    """Grouped bars per pool: median tasks/s of each profile, whiskers from worst to best run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.summary["pools"]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [("default", "Celery defaults (prefetch 4, early ack)"),
            ("project", "project (prefetch 1, late ack, owner tracking)")]  # fmt: skip
    if all("untracked_median" in row for row in rows):
        bars.append(("untracked", "project without owner tracking"))
    width = 0.8 / len(bars)
    for k, (profile, label) in enumerate(bars):
        offset = (k - (len(bars) - 1) / 2) * width
        meds = [row[f"{profile}_median"] for row in rows]
        lows = [m - row[f"{profile}_range"][0] for m, row in zip(meds, rows, strict=True)]
        highs = [row[f"{profile}_range"][1] - m for m, row in zip(meds, rows, strict=True)]
        ax.bar([x + offset for x in xs], meds, width=width, yerr=[lows, highs], capsize=4,
               label=label)  # fmt: skip
    ax.set_xticks(xs, [f"{row['pool']} -c {row['concurrency']}" for row in rows])
    ax.set(ylabel="tasks per second (median of runs)", title="Tiny-task throughput per pool")
    ax.legend(fontsize=8)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
