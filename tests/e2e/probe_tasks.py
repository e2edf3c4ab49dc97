"""Runs INSIDE a container of the stack (piped to ``python -`` by the e2e tests): the broker's
port is not published, so the test sends its tasks from where the application itself runs.

Sends one task per queue family through the application's own router, waits for each result and
prints one JSON object: {queue: {"task_id": ..., "result": {...}}}.
"""

from __future__ import annotations

import json
import sys

from services.celery_app import app

PROBES = {
    "default": ("tasks.default.record", {"key": "e2e-default", "payload": {"probe": True}}),
    "cpu_intensive": ("tasks.cpu_intensive.count_primes", {"size": 2000, "key": "e2e-cpu"}),
    "io_intensive": ("tasks.io_intensive.wait", {"duration": 0.1, "key": "e2e-io"}),
    "priority": ("tasks.priority.expedite", {"key": "e2e-priority"}),
    "scheduled": ("tasks.scheduled.run_job", {"job": "e2e", "key": "e2e-scheduled"}),
}


def main() -> int:
    sent = {queue: app.send_task(name, kwargs=kw) for queue, (name, kw) in PROBES.items()}
    out = {
        queue: {"task_id": res.id, "result": res.get(timeout=90, propagate=True)}
        for queue, res in sent.items()
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
