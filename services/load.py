"""Send a burst of tasks to chosen queues, to watch the workers (and the scaler) react.

``python -m services.load --queue io_intensive --count 500 [--duration 0.3]``; ``--queue`` may be
repeated or ``all``. Each queue gets its family's task: default -> tasks.default.record,
cpu_intensive -> tasks.cpu_intensive.count_primes(size), io_intensive -> tasks.io_intensive.wait
(duration), priority -> tasks.priority.expedite, scheduled -> tasks.scheduled.run_job.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from services.application import create_app
from services.config import QUEUE_NAMES, ConfigError, load_settings
from services.priorities import validate

TASK_FOR_QUEUE: dict[str, str] = {
    "default": "tasks.default.record",
    "cpu_intensive": "tasks.cpu_intensive.count_primes",
    "io_intensive": "tasks.io_intensive.wait",
    "priority": "tasks.priority.expedite",
    "scheduled": "tasks.scheduled.run_job",
}


def task_kwargs(queue: str, index: int, duration: float, size: int) -> dict[str, Any]:
    key = f"load-{index}"
    if queue == "cpu_intensive":
        return {"size": size, "key": key}
    if queue == "io_intensive":
        return {"duration": duration, "key": key}
    if queue == "scheduled":
        return {"job": "load", "key": key}
    return {"key": key}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queue",
        action="append",
        required=True,
        choices=[*QUEUE_NAMES, "all"],
        help="queue to load (repeatable, or 'all')",
    )
    parser.add_argument("--count", type=int, default=100, help="tasks per queue")
    parser.add_argument("--duration", type=float, default=0.3, help="io_intensive wait (s)")
    parser.add_argument("--size", type=int, default=20_000, help="cpu_intensive size")
    parser.add_argument("--priority", type=int, default=None, help="0..9, 9 most urgent")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count={args.count}: expected a whole number >= 1")
    if not 0 <= args.duration <= 60:
        parser.error(f"--duration={args.duration}: expected seconds from 0 to 60")
    if args.size < 0:
        parser.error(f"--size={args.size}: expected a whole number >= 0")
    if args.priority is not None:
        try:
            validate(args.priority)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        app = create_app(load_settings(), main="load")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    queues = list(QUEUE_NAMES) if "all" in args.queue else list(dict.fromkeys(args.queue))
    total = 0
    with app.producer_or_acquire() as producer:
        for queue in queues:
            for index in range(args.count):
                app.send_task(
                    TASK_FOR_QUEUE[queue],
                    kwargs=task_kwargs(queue, index, args.duration, args.size),
                    queue=app.settings.queue(queue),
                    priority=args.priority,
                    producer=producer,
                )
            total += args.count
            print(f"sent {args.count} {TASK_FOR_QUEUE[queue]} to {app.settings.queue(queue)}")
    print(f"sent {total} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
