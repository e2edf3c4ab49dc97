"""Helpers shared by the scaler's signal, backend, loop and CLI tests (not a test module)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis

T = TypeVar("T")


def poll_until(
    probe: Callable[[], T | None], what: str, timeout_s: float = 30.0, every_s: float = 0.1
) -> T:
    """Call ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


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
