"""``scaler simulate``: compare policies offline on a trace, with the real decision core.

    scaler simulate --policy FILE [--policy FILE2 ...] --trace FILE [--model FILE] [--seed N]
                    [--out DIR] [--json] [--horizon S]

Each policy runs on the same trace, model and seed, over the same horizon (the longest any of
them needs to return to its floor, unless --horizon says), so replica-seconds compare fairly.
Exit 0 on success, 2 when a policy, trace or model file cannot be used (every problem printed,
each naming the file and the field, as ``scaler validate`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from scaler.policy import Policy, PolicyError, load_policy
from scaler.simulate.engine import SimResult, simulate
from scaler.simulate.model import ModelError, ModelSpec, build_model, load_model_spec
from scaler.simulate.report import render_table, summarise, write_outputs
from scaler.simulate.trace import TraceError, load_trace

__all__ = ["add_parser", "cmd_simulate", "labels_for"]

BAD_INPUT = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to the ``scaler`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="replay a trace against policies offline (the real decision core, modelled workers)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="FILE",
        help="policy YAML; repeat to compare several (labelled by file stem)",
    )
    p.add_argument(
        "--trace",
        required=True,
        metavar="FILE",
        help="trace: .csv (t,queue,count) or .yaml generators "
        "(scaler/simulate/traces/ has examples)",
    )
    p.add_argument("--model", metavar="FILE", help="worker/host model YAML over the defaults")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="write summary.json, steps.csv, plot.png here")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout")
    p.add_argument(
        "--horizon",
        type=float,
        default=None,
        metavar="S",
        help="simulate exactly S seconds (default: until every policy is back at "
        "its floor after the last task)",
    )
    p.set_defaults(func=cmd_simulate)
    return p


def labels_for(paths: list[Path]) -> list[str]:
    """File stems, made unique: a stem used twice gets its parent folder, then a number."""
    stems = Counter(p.stem for p in paths)
    labels: list[str] = []
    for p in paths:
        label = p.stem if stems[p.stem] == 1 else f"{p.parent.name or '.'}/{p.stem}"
        base, n = label, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def _problems(path: Path, lines: tuple[str, ...] | list[str]) -> list[str]:
    return [x if x.startswith(str(path)) else f"{path}: {x}" for x in lines]


def cmd_simulate(args: argparse.Namespace) -> int:
    """Load everything (all problems at once), run each policy, print and write the results."""
    problems: list[str] = []
    paths = [Path(p) for p in args.policy]
    policies: dict[str, Policy] = {}
    for label, path in zip(labels_for(paths), paths, strict=True):
        try:
            policies[label] = load_policy(path)
        except PolicyError as exc:
            problems += _problems(path, exc.problems)
    trace = None
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        problems += list(exc.problems)
    spec: ModelSpec | None = None
    if args.model:
        try:
            spec = load_model_spec(args.model)
        except ModelError as exc:
            problems += list(exc.problems)
    if args.horizon is not None and not args.horizon > 0:
        problems.append(f"--horizon: {args.horizon!r} is invalid: expected seconds > 0")
    models = {}
    if trace is not None:
        for label, policy in policies.items():
            try:
                trace.check_queues(policy)
                models[label] = build_model(policy, trace.model, spec)
            except (TraceError, ModelError) as exc:
                problems += [f"{label}: {line}" for line in exc.problems]
    if problems or trace is None:
        for line in dict.fromkeys(problems):
            print(line, file=sys.stderr)
        return BAD_INPUT

    keep: Literal["changes"] = "changes"  # the CLI reports figures, not every hold
    results: dict[str, SimResult] = {
        label: simulate(
            policy, trace, models[label], seed=args.seed, horizon_s=args.horizon, decisions=keep
        )
        for label, policy in policies.items()
    }
    if args.horizon is None and len(results) > 1:
        # One horizon for all: a policy that settled earlier is re-run to the longest one, so
        # its replica-seconds include the replicas it keeps meanwhile.
        common = max(r.horizon_s for r in results.values())
        for label, r in results.items():
            if r.horizon_s < common:
                results[label] = simulate(
                    policies[label],
                    trace,
                    models[label],
                    seed=args.seed,
                    horizon_s=common,
                    decisions=keep,
                )
    summaries: dict[str, Any] = {}
    for label, r in results.items():
        summaries[label] = {"policy_file": str(paths[list(results).index(label)]), **summarise(r)}
    notes: list[str] = []
    if args.out:
        notes = write_outputs(Path(args.out), results, summaries)
    if args.json:
        print(json.dumps({"policies": summaries}, indent=1, sort_keys=True))
    else:
        print(f"trace {args.trace} ({trace.duration_s:g} s), seed {args.seed}")
        for label in results:
            print()
            print(render_table(label, summaries[label]))
        if args.out:
            print(f"\nwrote {args.out}/summary.json, steps.csv" + ("" if notes else ", plot.png"))
    for note in notes:
        print(note, file=sys.stderr)
    return 0
