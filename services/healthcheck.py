"""Container healthcheck: exit 0 if the worker's heartbeat file is fresh, 1 if stale or missing.

``python -m services.healthcheck [--file PATH] [--max-age SECONDS]``; the file defaults to
WORKER_HEARTBEAT_FILE (read through services.config, which is plain Python). Deliberately imports
neither Celery nor the app: it runs every few seconds in every replica.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from services.config import ConfigError, load_settings

DEFAULT_MAX_AGE_S = 30.0


def heartbeat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the file was last touched, or None when it does not exist."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", help="default: WORKER_HEARTBEAT_FILE")
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S, help="seconds")
    args = parser.parse_args(argv)
    if not args.file:
        try:
            args.file = load_settings().worker_heartbeat_file
        except ConfigError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1
    if not args.file:
        print("unhealthy: no --file given and WORKER_HEARTBEAT_FILE is not set", file=sys.stderr)
        return 1
    if args.max_age <= 0:
        print(f"--max-age={args.max_age}: expected a number of seconds > 0", file=sys.stderr)
        return 1
    age = heartbeat_age(Path(args.file))
    if age is None:
        print(f"unhealthy: heartbeat file {args.file} does not exist", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(
            f"unhealthy: heartbeat file {args.file} is {age:.1f}s old (max {args.max_age:g}s)",
            file=sys.stderr,
        )
        return 1
    print(f"healthy: heartbeat {age:.1f}s old")
    return 0


if __name__ == "__main__":
    sys.exit(main())
