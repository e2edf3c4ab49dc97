"""Fixtures for the Celery service's tests: real worker processes on real brokers.

Workers are ``celery -A services.celery_app worker`` subprocesses in their own process group, always
stopped in a finally. Each test gets its own Redis key prefix (below the session's) or, on
RabbitMQ, its own queue-name prefix, and deletes what it created.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import pytest
import redis
from kombu import Connection
from support.polling import poll_until

from services.application import ServiceApp, create_app
from services.config import QUEUE_NAMES, load_settings
from services.migrate import migrate

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@pytest.fixture(scope="session")
def poll() -> Callable[..., Any]:
    return poll_until


@pytest.fixture(scope="session")
def service_database(database_url: str) -> str:
    """The session database with the service's schema applied."""
    migrate(database_url, deadline_s=30)
    return database_url


@dataclass
class ServiceEnv:
    """The environment for one test's service processes, and a client app built from it."""

    env: dict[str, str]
    tmp: Path
    _apps: list[ServiceApp] = field(default_factory=list)

    def app(self, **overrides: str) -> ServiceApp:
        app = create_app(load_settings({**self.env, **overrides}), main="test-client")
        self._apps.append(app)
        return app

    def queue(self, name: str) -> str:
        return self.env.get("CELERY_QUEUE_PREFIX", "") + name

    def close(self) -> None:
        for app in self._apps:
            app.close()


def _base_env(tmp: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "TASK_RECORD"))}
    env.update(
        DATABASE_URL=database_url,
        WORKER_HEARTBEAT_FILE=str(tmp / "heartbeat"),
        WORKER_HEARTBEAT_INTERVAL="1",
        CELERY_SOFT_SHUTDOWN_TIMEOUT="5",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def redis_env(
    redis_url: str, key_prefix: str, service_database: str, tmp_path: Path
) -> Iterator[ServiceEnv]:
    """Redis broker and results under a key prefix of this test's own; its keys deleted after."""
    prefix = f"{key_prefix}{uuid.uuid4().hex[:6]}:"
    env = _base_env(tmp_path, service_database)
    env.update(CELERY_BROKER_URL=redis_url, CELERY_KEY_PREFIX=prefix)
    service = ServiceEnv(env, tmp_path)
    try:
        yield service
    finally:
        service.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def amqp_env(
    amqp_url: str, redis_url: str, key_prefix: str, service_database: str, tmp_path: Path
) -> Iterator[ServiceEnv]:
    """RabbitMQ broker with queue names of this test's own (deleted after); results in Redis."""
    queue_prefix = f"t{uuid.uuid4().hex[:8]}."
    prefix = f"{key_prefix}{uuid.uuid4().hex[:6]}:"
    env = _base_env(tmp_path, service_database)
    env.update(
        CELERY_BROKER_URL=amqp_url,
        CELERY_RESULT_BACKEND=redis_url,
        CELERY_QUEUE_PREFIX=queue_prefix,
        CELERY_KEY_PREFIX=prefix,
    )
    service = ServiceEnv(env, tmp_path)
    try:
        yield service
    finally:
        service.close()
        with Connection(amqp_url) as conn:
            channel = conn.channel()
            for name in QUEUE_NAMES:
                try:
                    channel.queue_delete(queue_prefix + name)
                    channel.exchange_delete(queue_prefix + name)
                except Exception:
                    channel = conn.channel()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


class WorkerProcess:
    """One real ``celery worker`` process (and its pool children), logging to a file."""

    def __init__(
        self,
        env: dict[str, str],
        queues: list[str],
        log_path: Path,
        concurrency: int = 1,
        pool: str = "prefork",
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        # ``command`` replaces the test command line below (e.g. the image's start script).
        cmd = command or [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "services.celery_app",
            "worker",
            "-Q",
            ",".join(queues),
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-n",
            f"{self.name}@%h",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "INFO",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, **(extra_env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            return " ready." in self.log()

        poll_until(ready, f"worker {self.name} ready", timeout)

    def children(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM to the main process only, as tini does); kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: main process and pool children at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.terminate(timeout=15)
        # Children orphaned by a kill of the main process only.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory for worker processes; every one is stopped when the test ends."""
    started: list[WorkerProcess] = []

    def start(
        service: ServiceEnv, queues: list[str], ready: bool = True, **kwargs: Any
    ) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(service.env, [service.queue(q) for q in queues], log_path, **kwargs)
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.cleanup()


@pytest.fixture
def db(service_database: str) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit connection to the session database, for assertions."""
    conn = psycopg2.connect(service_database)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()
