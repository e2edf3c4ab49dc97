"""Helpers shared by the scaler's signal, backend, loop and CLI tests (not a test module)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from support.polling import poll_until

from scaler.api import ScalerHTTPServer

T = TypeVar("T")
# Starts an API server on a free port with the given arguments (tests/scaler/conftest.py: serve).
ServerFactory = Callable[..., ScalerHTTPServer]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def own_redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own on a free port, so the test may kill it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: install redis-server (apt) to run this")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        poll_until(ping, f"redis-server on port {port}", timeout_s=10)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def worker_env(redis_url: str, database_url: str, key_prefix: str) -> dict[str, str]:
    """Environment for `services.celery_app` workers and clients pointed at the test's servers."""
    return {
        **os.environ,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "DATABASE_URL": database_url,
        "CELERY_KEY_PREFIX": key_prefix,
        "LOG_LEVEL": "INFO",
    }


def migrate(database_url: str) -> None:
    """Create the service's tables (task_effects...) in the test database, as a deploy would."""
    import sys

    subprocess.run(
        [sys.executable, "-m", "services.migrate"],
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
        timeout=120,
    )


def service_app(env: dict[str, str]) -> Any:
    """The project's Celery app configured from ``env`` (the same settings its workers read)."""
    from services.application import create_app
    from services.config import load_settings

    return create_app(load_settings(env), main=f"scaler-test-{uuid.uuid4().hex[:6]}")


def ping_names(app: Any, timeout_s: float = 1.0) -> set[str]:
    """Node names of the workers that answer a control-API ping."""
    replies = app.control.inspect(timeout=timeout_s).ping() or {}
    return set(replies)


def effects(database_url: str, task_ids: list[str]) -> dict[str, int]:
    """task_effects rows per task id (must be 1 each: exactly once)."""
    import psycopg2

    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT task_id, count(*) FROM task_effects WHERE task_id = ANY(%s) "
                "GROUP BY task_id",
                (task_ids,),
            )
            return {row[0]: int(row[1]) for row in cur.fetchall()}
    finally:
        conn.close()


def consumed(app: Any, node: str) -> list[str] | None:
    """The queues ``node`` consumes, as it says itself (None: no answer within a second)."""
    replies = app.control.inspect([node], timeout=1.0).active_queues() or {}
    return None if node not in replies else [q["name"] for q in replies[node]]


def local_policy(
    services: dict[str, list[str]],
    *,
    interval_s: float = 0.3,
    max_replicas: int = 3,
    up: dict[str, float] | None = None,
    down: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A policy for scaler tests on local workers: fast cycles, five tasks per replica, host
    limits off (a busy CI host must not block scaling); ``services``: name -> queues;
    ``up``/``down``: the scale_up/scale_down settings that differ from the defaults."""
    defaults: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": max_replicas,
        "target": {"tasks_per_replica": 5, "tolerance": 0.1},
    }
    if up is not None:
        defaults["scale_up"] = up
    if down is not None:
        defaults["scale_down"] = down
    return {
        "interval_s": interval_s,
        "stale_after_s": 5,
        "host": {"cpu_percent": 100, "memory_percent": 100},
        "defaults": defaults,
        "services": {name: {"queues": queues} for name, queues in services.items()},
    }
