"""``python -m bench [names...]``: run benchmarks, save their results, rewrite the report.

Without names every registered benchmark runs. ``--report-only`` rebuilds docs/benchmarks.md and
the plots from the saved results without measuring; ``--quick`` takes fewer samples (a smoke run
of the machinery, not figures to publish).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from bench import registry
from bench.context import Context
from bench.machine import machine_facts
from bench.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of "
                        f"{', '.join(registry.MODULES)})")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild the report from bench/results/")  # fmt: skip
    args = parser.parse_args(argv)
    names = args.names or list(registry.MODULES)
    try:
        benchmarks = [registry.load(name) for name in names]
        ctx = Context.from_env(quick=args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    failed: list[str] = []
    if not args.report_only:
        facts = machine_facts()
        for bench in benchmarks:
            ctx.log(f"{bench.NAME}: starting")
            load_before = os.getloadavg()[0]
            try:
                result = bench.run(ctx)
            except Exception:
                traceback.print_exc()
                failed.append(bench.NAME)
                ctx.log(f"{bench.NAME}: FAILED (its previous results, if any, are kept)")
                continue
            # Other work on the machine moves every figure: say how busy it was.
            result.machine = {**facts, "load_1min_before": load_before,
                              "load_1min_after": os.getloadavg()[0]}  # fmt: skip
            path = result.save(ctx.results_dir)
            ctx.log(f"{bench.NAME}: done in {result.duration_s:.0f}s, saved {path}")
    report = write_report(ctx)
    ctx.log(f"report written to {report}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
