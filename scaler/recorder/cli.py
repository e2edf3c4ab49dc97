"""`scaler run --record*` flags and `scaler record export`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from scaler.recorder.settings import (
    DEFAULT_MAX_MB,
    DEFAULT_RESOLUTION_S,
    RECORD_FILE_ENV,
    RECORD_MAX_MB_ENV,
    RECORD_RESOLUTION_ENV,
    RecorderError,
    RecorderSettings,
    positive_value,
)
from scaler.recorder.tracefile import export_trace, iso_time


def add_run_flags(run: argparse.ArgumentParser) -> None:
    """`scaler run --record FILE [--record-max-mb MB] [--record-resolution S]`."""
    run.add_argument("--record", default=os.environ.get(RECORD_FILE_ENV) or None, metavar="FILE",
                     help=f"record task arrivals to FILE (default ${RECORD_FILE_ENV}; "
                     "unset: no recording)")  # fmt: skip
    run.add_argument("--record-max-mb", default=os.environ.get(RECORD_MAX_MB_ENV), metavar="MB",
                     help=f"rotate FILE to FILE.1 past this size (default ${RECORD_MAX_MB_ENV}, "
                     f"else {DEFAULT_MAX_MB:g}); at most twice this on disk")  # fmt: skip
    run.add_argument("--record-resolution", default=os.environ.get(RECORD_RESOLUTION_ENV),
                     metavar="S", help=f"bucket width in seconds (default "
                     f"${RECORD_RESOLUTION_ENV}, else {DEFAULT_RESOLUTION_S:g})")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> RecorderSettings | None:
    """The recorder settings of `scaler run`, None without --record; SystemExit if invalid."""
    if not args.record:
        return None
    try:
        return RecorderSettings.from_values(args.record, args.record_max_mb, args.record_resolution)
    except RecorderError as exc:
        raise SystemExit(str(exc)) from None


def add_record_command(sub: Any) -> None:
    """`scaler record export --file FILE [--since-hours H] --out TRACE.csv`."""
    record = sub.add_parser("record", help="the flight recorder's files (scaler run --record)")
    actions = record.add_subparsers(dest="record_command", required=True)
    export = actions.add_parser(
        "export", help="merge FILE.1 and FILE into one trace for `scaler simulate --trace`"
    )
    export.add_argument("--file", default=os.environ.get(RECORD_FILE_ENV) or None,
                        help=f"the recording (default ${RECORD_FILE_ENV})")  # fmt: skip
    export.add_argument("--since-hours", default=None, metavar="H",
                        help="keep only the last H hours before now")  # fmt: skip
    export.add_argument("--out", required=True, help="the trace CSV to write")
    export.set_defaults(func=cmd_record_export)


def cmd_record_export(args: argparse.Namespace) -> int:
    if not args.file:
        print(f"--file: no recording given (pass --file FILE or set {RECORD_FILE_ENV})",
              file=sys.stderr)  # fmt: skip
        return 1
    since: float | None = None
    if args.since_hours is not None:
        problems: list[str] = []
        since = positive_value(
            args.since_hours, 0.0, "--since-hours", "a number of hours > 0", problems
        )
        if problems:
            print(problems[0], file=sys.stderr)
            return 1
    try:
        summary = export_trace(Path(args.file), Path(args.out), since)
    except OSError as exc:
        print(f"--file {args.file}: {exc}", file=sys.stderr)
        return 1
    if summary.skipped_lines:
        print(f"{args.file}: skipped {summary.skipped_lines} line(s) that were not rows of a "
              "recorded segment", file=sys.stderr)  # fmt: skip
    if not summary.rows:
        window = f" in the last {args.since_hours} h" if since is not None else ""
        print(f"{args.out}: no arrivals recorded{window}; wrote an empty trace", file=sys.stderr)
        return 1
    start = iso_time(summary.first_epoch or 0.0)
    print(f"{args.out}: {summary.tasks} tasks in {summary.rows} rows, queues "
          f"{', '.join(summary.queues)}, {summary.span_s:.0f} s from {start}")  # fmt: skip
    return 0
