"""Simulator speed: a day of five services at a 2 s cycle, timed in process and as a command.

``scaler simulate`` is only useful if a day of traffic replays in the time it takes to read the
result: the goal is under 10 s on one core. The trace is scaler/simulate/traces/diurnal.yaml
(24 hours on the five queues, about 360,000 tasks: day curves, random urgent tasks, nightly jobs
and two floods) against compose/scaler-policy.yaml (a 2 s cycle, so 43,200 cycles, each building
the observations of five services and calling the real ``decide()``).

Two things are timed, each 3 times (median reported): ``simulate()`` in this process, on an
already loaded policy and trace (``decisions="changes"``, as the command keeps them; the arrivals
are generated inside the call and counted), wall time (``time.perf_counter``) and CPU time of the
process (``time.process_time``); and the whole command, ``scaler simulate --policy ...
--trace ...`` as a subprocess printing its table (interpreter start, imports, loading, the run
and the summary), wall time and the child's CPU time (user + system, from ``getrusage``). The
simulator is single-threaded, so its CPU time is the time it needs of one core; the wall time
also holds whatever else the machine was doing. Throughput is tasks published and cycles run per
second of wall time.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.result import Result

NAME = "sim_speed"
TITLE = "Simulator speed: a day of five services at a 2 s cycle"
POLICY = "compose/scaler-policy.yaml"
TRACE = "scaler/simulate/traces/diurnal.yaml"
RUNS = 3
GOAL_S = 10.0
QUICK_DURATION_S = 7200.0  # --quick: the first two hours of the day


def _trace(ctx: Context) -> Any:
    import yaml

    from scaler.simulate.trace import load_trace, parse_trace_data

    if not ctx.quick:
        return load_trace(ctx.root / TRACE)
    data = yaml.safe_load((ctx.root / TRACE).read_text())
    data["duration_s"] = QUICK_DURATION_S
    data["load"] = [g for g in data["load"] if g.get("at", 0) < QUICK_DURATION_S]
    return parse_trace_data(data, TRACE)


def time_inprocess(ctx: Context) -> list[dict[str, float]]:
    from scaler.policy import load_policy
    from scaler.simulate import simulate

    policy = load_policy(ctx.root / POLICY)
    trace = _trace(ctx)
    runs = []
    for i in range(RUNS):
        wall, cpu = time.perf_counter(), time.process_time()
        result = simulate(policy, trace, seed=0, decisions="changes")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append({"wall_s": wall, "cpu_s": cpu, "tasks": float(result.published),
                     "completed": float(result.completed), "cycles": float(result.cycles),
                     "horizon_s": result.horizon_s})  # fmt: skip
        ctx.log(f"sim speed: simulate() run {i + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                f"{result.published} tasks, {result.cycles} cycles")  # fmt: skip
        del result
    return runs


def time_command(ctx: Context) -> list[dict[str, float]]:
    scaler = Path(sys.executable).with_name("scaler")
    runs = []
    for i in range(RUNS):
        if ctx.quick:
            cmd = [str(scaler), "simulate", "--policy", POLICY, "--trace", TRACE, "--horizon",
                   str(QUICK_DURATION_S)]  # fmt: skip
        else:
            cmd = [str(scaler), "simulate", "--policy", POLICY, "--trace", TRACE, "--seed", "0"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        subprocess.run(cmd, cwd=ctx.root, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs.append({"wall_s": wall, "cpu_s": cpu})
        ctx.log(f"sim speed: command run {i + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    return runs


def run(ctx: Context) -> Result:
    started_at, t0 = time.time(), time.monotonic()
    inproc = time_inprocess(ctx)
    command = time_command(ctx)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    wall = med(inproc, "wall_s")
    summary = {
        "simulate_wall_s": wall,
        "simulate_cpu_s": med(inproc, "cpu_s"),
        "command_wall_s": med(command, "wall_s"),
        "command_cpu_s": med(command, "cpu_s"),
        "tasks": inproc[0]["tasks"],
        "cycles": inproc[0]["cycles"],
        "horizon_s": inproc[0]["horizon_s"],
        "tasks_per_s": inproc[0]["tasks"] / wall,
        "cycles_per_s": inproc[0]["cycles"] / wall,
        "simulated_s_per_s": inproc[0]["horizon_s"] / wall,
    }
    result = Result(
        name=NAME, title=TITLE, started_at=started_at, duration_s=time.monotonic() - t0,
        settings={"policy": POLICY, "trace": TRACE + (f" (first {QUICK_DURATION_S:.0f} s only: "
                                                      "--quick)" if ctx.quick else ""),
                  "seed": 0, "runs": RUNS, "decisions kept": "changes (as the command)",
                  "python": sys.version.split()[0]},
        samples={"simulate": inproc, "command": command}, summary=summary,
    )  # fmt: skip
    result.notes = notes(result)
    return result


def notes(result: Result) -> list[str]:
    s = result.summary
    out = []
    if "--quick" in str(result.settings["trace"]):
        out.append("Quick run: two hours of the trace, not the day; the goal is not judged.")
        return out
    ok_cpu = s["simulate_cpu_s"] < GOAL_S
    ok_cmd = s["command_cpu_s"] < GOAL_S
    out.append(
        f"Goal: a day of the five-service trace in under {GOAL_S:g} s on one core: simulate() "
        f"needs {s['simulate_cpu_s']:.1f} s of CPU ({s['simulate_wall_s']:.1f} s wall), "
        f"{'met' if ok_cpu else 'missed'}; the whole command {s['command_cpu_s']:.1f} s of CPU "
        f"({s['command_wall_s']:.1f} s wall), {'met' if ok_cmd else 'missed'}."
    )
    gap = s["command_cpu_s"] - s["simulate_cpu_s"]
    out.append(
        f"The command costs {gap:.1f} s of CPU more than the call: interpreter start, imports "
        "(pydantic, the policy model), loading the files, the summary (percentiles over every "
        "task's latency) and the table."
    )
    return out


def render(result: Result) -> str:
    s = result.summary
    lines = [
        "| Measured | Wall (s), median of 3 | CPU (s), median of 3 |",
        "|---|---|---|",
        f"| `simulate()` in process | {s['simulate_wall_s']:.2f} | {s['simulate_cpu_s']:.2f} |",
        f"| `scaler simulate` command | {s['command_wall_s']:.2f} | {s['command_cpu_s']:.2f} |",
        "",
        f"{s['tasks']:,.0f} tasks and {s['cycles']:,.0f} cycles over {s['horizon_s']:,.0f} "
        f"simulated seconds: {s['tasks_per_s']:,.0f} tasks/s, {s['cycles_per_s']:,.0f} cycles/s, "
        f"{s['simulated_s_per_s']:,.0f} simulated seconds per second (wall time of `simulate()`).",
    ]
    return "\n".join(lines)


def plot(result: Result, img_dir: Path) -> list[Path]:
    return []  # two figures and a throughput line: the table says it all
