"""Backing services for the whole suite: real Redis, PostgreSQL and RabbitMQ.

When REDIS_URL, DATABASE_URL and AMQP_URL are all set, the suite uses them (fast iteration against
servers already running). Otherwise it starts its own in throwaway containers
(tests/backing-services.yaml, images from REDIS_IMAGE / POSTGRES_IMAGE / RABBITMQ_IMAGE) and removes
them afterwards. Either way each session gets its own PostgreSQL database and its own Redis key
prefix, so runs never see each other's data.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import kombu
import psycopg2
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
BACKING_COMPOSE = ROOT / "tests" / "backing-services.yaml"
TEST_PROJECT_PREFIX = "cst-test-"


@dataclass(frozen=True)
class Backing:
    """Where the backing services are, for this session."""

    redis_url: str
    amqp_url: str
    admin_database_url: str
    source: str  # "environment" or "containers"


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _compose(project: str, env: dict[str, str], *args: str, check: bool = True) -> str:
    cmd = ["docker", "compose", "-p", project, "-f", str(BACKING_COMPOSE), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _wait_until(what: str, probe: Callable[[], object], deadline_s: float = 90.0) -> None:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            probe()
            return
        except Exception as exc:  # any failure is retried until the deadline
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {deadline_s}s: {last}")


def _amqp_handshake(url: str) -> None:
    """Raises unless an AMQP connection to ``url`` opens (the whole handshake, not the port)."""
    with kombu.Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)


@pytest.fixture(scope="session")
def backing() -> Iterator[Backing]:
    env_urls = [os.environ.get(k) for k in ("REDIS_URL", "DATABASE_URL", "AMQP_URL")]
    if all(env_urls):
        redis_url, db_url, amqp_url = env_urls  # type: ignore[misc]
        yield Backing(redis_url, amqp_url, db_url, "environment")
        return
    if not docker_available():
        pytest.exit(
            "No REDIS_URL/DATABASE_URL/AMQP_URL given and no Docker engine to start them: "
            "set the three URLs or install Docker (../shared/tools/install-docker.sh).",
            returncode=2,
        )
    project = f"{TEST_PROJECT_PREFIX}backing-{uuid.uuid4().hex[:8]}"
    redis_pw = secrets.token_hex(16)
    pg_pw = secrets.token_hex(16)
    env = {**os.environ, "TEST_REDIS_PASSWORD": redis_pw, "TEST_POSTGRES_PASSWORD": pg_pw}
    try:
        _compose(project, env, "up", "-d", "--wait", "--wait-timeout", "180")

        def port(service: str, inner: int) -> int:
            out = _compose(project, env, "port", service, str(inner)).strip()
            return int(out.rsplit(":", 1)[1])

        backing = Backing(
            redis_url=f"redis://:{redis_pw}@127.0.0.1:{port('redis', 6379)}/0",
            amqp_url=f"amqp://guest:guest@127.0.0.1:{port('rabbitmq', 5672)}//",
            admin_database_url=f"postgresql://test:{pg_pw}@127.0.0.1:{port('postgres', 5432)}/test",
            source="containers",
        )
        _wait_until("redis", lambda: redis.Redis.from_url(backing.redis_url).ping())
        _wait_until("postgres", lambda: psycopg2.connect(backing.admin_database_url).close())
        # `rabbitmq-diagnostics ping` answers before the AMQP listener accepts connections.
        _wait_until("rabbitmq", lambda: _amqp_handshake(backing.amqp_url))
        yield backing
    finally:
        _compose(project, env, "down", "-v", "--remove-orphans", "-t", "0", check=False)


@pytest.fixture(scope="session")
def redis_url(backing: Backing) -> str:
    return backing.redis_url


@pytest.fixture(scope="session")
def amqp_url(backing: Backing) -> str:
    return backing.amqp_url


@pytest.fixture(scope="session")
def key_prefix() -> str:
    """A Redis key prefix of this session's own (kombu's global_keyprefix)."""
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def database_url(backing: Backing) -> Iterator[str]:
    """A PostgreSQL database created for this session and dropped after it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(backing.admin_database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(backing.admin_database_url)
    url = urlunsplit(parts._replace(path=f"/{name}"))
    try:
        yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


# -- parallel runs (pytest-xdist, `make test` runs two workers) ----------------------------------

# Which tests must share a worker, decided from the node id alone (in the controller, which never
# sees the items). The whole-stack suites (tests/e2e, whose session-scoped stack is built once per
# worker, and the chaos stack of tests/chaos/test_stack_chaos.py) are one unit: one worker brings
# each stack up once and runs them one after the other, so two full stacks never compete for the
# machine's two cores while the other worker runs everything else. Every other file is a unit of
# its own, so its module-scoped fixtures are built once. (xdist's own `loadgroup` marks cannot do
# this under pytest 9: xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads.)
STACK_SUITES = ("tests/e2e/", "tests/chaos/test_stack_chaos.py")
# Every file under tests/swarm/ shares the session's three-node swarm: one unit, so one worker
# starts that cluster once (tests/swarm/conftest.py) and runs them all.
SWARM_SUITE = "tests/swarm/"


def work_unit(nodeid: str) -> str:
    """The unit of scheduling a test belongs to: "stacks", "swarm" or its file."""
    path = nodeid.split("::", 1)[0]
    if path.startswith(SWARM_SUITE):
        return "swarm"
    return "stacks" if path.startswith(STACK_SUITES) else path


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Load-balance whole units (see ``work_unit``), the largest first: the stacks start at once."""
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByUnit(config, log)
