"""Fixtures for the chaos suite: isolated service environments, real workers, figures.

Every test gets its own Redis key prefix (below the session's) and, on RabbitMQ, its own queue
prefix, and deletes what it made. Effects go to the session's PostgreSQL database with the
service's schema. Each scenario's figures are appended to $CHAOS_REPORT with the test's outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from chaos_environment import ChaosEnv, base_env
from chaos_figures import Figures, append
from chaos_processes import WorkerProcess
from kombu import Connection

from services.config import QUEUE_NAMES
from services.migrate import migrate

BROKERS = ("redis", "amqp")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so the figures fixture knows the outcome."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"chaos_report_{report.when}", report)


@pytest.fixture(scope="session")
def chaos_database(database_url: str) -> str:
    """The session database with the service's schema."""
    migrate(database_url, deadline_s=30)
    return database_url


def _delete_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    except redis.exceptions.RedisError:
        pass  # a server of the test's own that is already gone
    finally:
        client.close()


def _delete_amqp(url: str, queue_prefix: str) -> None:
    with Connection(url) as conn:
        channel = conn.channel()
        for name in QUEUE_NAMES:
            try:
                channel.queue_delete(queue_prefix + name)
                channel.exchange_delete(queue_prefix + name)
            except conn.channel_errors:
                channel = conn.channel()


@pytest.fixture
def make_env(
    redis_url: str, amqp_url: str, key_prefix: str, chaos_database: str, tmp_path: Path
) -> Iterator[Callable[..., ChaosEnv]]:
    """Factory: ``make_env("redis")``, ``make_env("amqp")`` or ``make_env("redis", url)``.

    Results and success records always go to the shared Redis (under the test's prefix), so a
    broker of the test's own can be killed without touching them.
    """
    made: list[ChaosEnv] = []

    def make(broker: str, broker_url: str | None = None) -> ChaosEnv:
        if broker not in BROKERS:
            raise ValueError(f"broker={broker!r}: expected one of {', '.join(BROKERS)}")
        prefix = f"{key_prefix}{uuid.uuid4().hex[:6]}:"
        url = broker_url or (redis_url if broker == "redis" else amqp_url)
        env = base_env(tmp_path, chaos_database)
        env.update(
            CELERY_BROKER_URL=url,
            CELERY_RESULT_BACKEND=redis_url,
            TASK_RECORDS_REDIS_URL=redis_url,
            CELERY_KEY_PREFIX=prefix,
        )
        if broker == "amqp":
            env["CELERY_QUEUE_PREFIX"] = f"t{uuid.uuid4().hex[:8]}."
        chaos = ChaosEnv(broker, env, prefix, redis_url, url, tmp_path)
        made.append(chaos)
        return chaos

    try:
        yield make
    finally:
        for chaos in made:
            chaos.close()
            _delete_keys(redis_url, chaos.key_prefix)
            if chaos.broker_url != redis_url and chaos.broker == "redis":
                _delete_keys(chaos.broker_url, chaos.key_prefix)
            if chaos.broker == "amqp":
                _delete_amqp(chaos.broker_url, chaos.env["CELERY_QUEUE_PREFIX"])


@pytest.fixture(params=BROKERS)
def chaos_env(request: pytest.FixtureRequest, make_env: Callable[..., ChaosEnv]) -> ChaosEnv:
    """The scenario's environment, once per broker."""
    return make_env(request.param)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory for worker processes; every one is stopped (and its group killed) at the end."""
    started: list[WorkerProcess] = []

    def start(
        chaos: ChaosEnv,
        queues: list[str],
        concurrency: int = 1,
        ready: bool = True,
        extra_env: dict[str, str] | None = None,
        pool: str = "prefork",
    ) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(
            {**chaos.env, **(extra_env or {})},
            [chaos.queue(q) for q in queues],
            log_path,
            concurrency=concurrency,
            pool=pool,
        )
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
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """The scenario's figures, filled by the test and reported with its outcome."""
    callspec = getattr(request.node, "callspec", None)
    params: dict[str, Any] = dict(callspec.params) if callspec else {}
    broker = str(params.get("chaos_env", params.get("broker", "")))
    scenario = request.node.originalname.removeprefix("test_")
    result = Figures(scenario=scenario, broker=broker)
    yield result
    report = getattr(request.node, "chaos_report_call", None)
    if report is not None:
        result.outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        append(result)
