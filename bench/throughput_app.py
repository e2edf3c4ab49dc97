"""The Celery app benchmark 4's workers run: one tiny task, settings chosen by BENCH_PROFILE.

"project" sets what services/application.py sets for delivery (late acks, reject on worker lost,
prefetch 1); "default" leaves Celery's defaults (early ack, prefetch 4). Everything else is the
same in both, including the project's Redis priority layout (ten lists per queue), so the figures
compare the delivery settings and nothing else. Read from the environment because the worker is
started as ``celery -A bench.throughput_app worker``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from services.config import PRIORITY_SEP, PRIORITY_STEPS

# The delivery settings of services/application.py's create_app (keep in step with it).
PROJECT_DELIVERY: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
}
# services/application.py also records who holds each unacked message (services.ownership):
# "project" includes it; "project-untracked" is the same without it, to measure its cost.
OWNER_TRACKING: dict[str, Any] = {"broker_transport": "services.ownership:Transport"}
PROFILES: dict[str, dict[str, Any]] = {
    "project": {**PROJECT_DELIVERY, **OWNER_TRACKING},
    "default": {},
    "project-untracked": PROJECT_DELIVERY,
}


def make_app(broker_url: str, key_prefix: str, profile: str) -> Celery:
    """A JSON-only app on ``broker_url`` with every key under ``key_prefix``."""
    if profile not in PROFILES:
        raise ValueError(f"BENCH_PROFILE={profile!r}: expected one of {', '.join(PROFILES)}")
    app = Celery("cst_bench_throughput", broker=broker_url)
    options: dict[str, Any] = {
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
    }
    if key_prefix:
        options["global_keyprefix"] = key_prefix
    if "broker_transport" in PROFILES[profile]:
        options["unacked_owner_key"] = "unacked_owner"
    app.conf.update(
        broker_transport_options=options,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **PROFILES[profile],
    )
    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("BENCH_KEY_PREFIX", ""),
    os.environ.get("BENCH_PROFILE", "project"),
)
_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    """One client per process (created after a prefork child starts, never shared across fork)."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(app.conf.broker_url)
    return _client


@app.task(name="bench.tick")
def tick(counter: str, total: int) -> None:
    """Count one done; the first and the last also record the time, for tasks per second."""
    client = _redis()
    done = int(client.incr(counter))  # type: ignore[arg-type]
    if done == 1:
        client.set(f"{counter}:first", repr(time.time()))
    if done == total:
        client.set(f"{counter}:last", repr(time.time()))
