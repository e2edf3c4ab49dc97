"""Operational commands: heartbeat + healthcheck, migrations, the load generator."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from services.config import PRIORITY_SEP
from services.migrate import available_migrations, migrate

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env if env is not None else os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthcheck_exit_codes(tmp_path: Path) -> None:
    beat = tmp_path / "hb"
    assert run_module("services.healthcheck", "--file", str(beat)).returncode == 1  # missing
    beat.touch()
    fresh = run_module("services.healthcheck", "--file", str(beat), "--max-age", "30")
    assert fresh.returncode == 0, fresh.stderr
    old = time.time() - 120
    os.utime(beat, (old, old))
    stale = run_module("services.healthcheck", "--file", str(beat), "--max-age", "30")
    assert stale.returncode == 1 and "old" in stale.stderr


@pytest.mark.slow
def test_worker_touches_its_heartbeat_file(redis_env: Any, start_worker: Any, poll: Any) -> None:
    heartbeat = Path(redis_env.env["WORKER_HEARTBEAT_FILE"])
    worker = start_worker(redis_env, ["default"])
    poll(heartbeat.exists, "the heartbeat file at ready")
    first = heartbeat.stat().st_mtime
    poll(lambda: heartbeat.stat().st_mtime > first, "a later heartbeat (interval 1 s)")
    env = {**redis_env.env}
    assert run_module("services.healthcheck", "--max-age", "5", env=env).returncode == 0
    worker.terminate()
    old = time.time() - 60
    os.utime(heartbeat, (old, old))
    assert run_module("services.healthcheck", "--max-age", "5", env=env).returncode == 1


def test_migrations_apply_once_even_from_concurrent_runners(backing: Any) -> None:
    # A database of this test's own, so "applied by this call" is exact.
    admin = psycopg2.connect(backing.admin_database_url)
    admin.autocommit = True
    name = f"t_mig_{os.getpid()}_{int(time.time() * 1000) % 100000}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = backing.admin_database_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        results: list[list[str]] = []
        threads = [threading.Thread(target=lambda: results.append(migrate(url))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        versions = [m.version for m in available_migrations()]
        assert sorted(results, key=len) == [[], [], versions]
        assert migrate(url) == []
        proc = run_module("services.migrate", env={**os.environ, "DATABASE_URL": url})
        assert proc.returncode == 0 and "none pending" in proc.stdout
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT version FROM schema_migrations")
            assert [row[0] for row in cur.fetchall()] == versions
            cur.execute("SELECT to_regclass('task_effects'), to_regclass('daily_reports')")
            assert None not in cur.fetchone()
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_migrate_gives_up_at_its_deadline() -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    proc = run_module("services.migrate", "--deadline", "1", env=env)
    assert proc.returncode == 1 and "not reachable within 1s" in proc.stderr


def test_load_sends_a_burst_to_every_queue(redis_env: Any, redis_url: str) -> None:
    proc = run_module(
        "services.load", "--queue", "all", "--count", "3", "--priority", "9", env=redis_env.env
    )
    assert proc.returncode == 0, proc.stderr
    assert "sent 15 tasks" in proc.stdout
    client = redis.Redis.from_url(redis_url)
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    for queue in ("default", "cpu_intensive", "io_intensive", "priority", "scheduled"):
        assert client.llen(f"{prefix}{queue}") == 3, queue  # priority 9: the bare list
        assert client.llen(f"{prefix}{queue}{PRIORITY_SEP}4") == 0


def test_load_rejects_bad_arguments(redis_env: Any) -> None:
    proc = run_module("services.load", "--queue", "nope", env=redis_env.env)
    assert proc.returncode == 2 and "--queue" in proc.stderr
    proc = run_module("services.load", "--queue", "default", "--count", "0", env=redis_env.env)
    assert proc.returncode == 2 and "--count=0" in proc.stderr
