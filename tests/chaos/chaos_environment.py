"""One scenario's service environment: the variables its processes get, and its readers.

Every scenario has its own Redis key prefix and, on RabbitMQ, its own queue-name prefix, so
scenarios never see each other's messages, results or success records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from exactly_once import AmqpBroker, BrokerReader, PostgresEffects, RedisBroker

from services.application import ServiceApp, create_app
from services.config import load_settings


@dataclass
class ChaosEnv:
    """The environment of one scenario's service processes, and readers for its outcome."""

    broker: str  # "redis" or "amqp"
    env: dict[str, str]
    key_prefix: str
    records_url: str
    broker_url: str
    tmp: Path
    _apps: list[ServiceApp] = field(default_factory=list)

    def app(self, **overrides: str) -> ServiceApp:
        app = create_app(load_settings({**self.env, **overrides}), main="chaos-client")
        self._apps.append(app)
        return app

    def queue(self, name: str) -> str:
        return self.env.get("CELERY_QUEUE_PREFIX", "") + name

    def broker_reader(self) -> BrokerReader:
        if self.broker == "redis":
            return RedisBroker(self.broker_url, self.key_prefix)
        return AmqpBroker(self.broker_url)

    @property
    def effects(self) -> PostgresEffects:
        return PostgresEffects(self.env["DATABASE_URL"])

    def close(self) -> None:
        for app in self._apps:
            app.close()


def base_env(tmp: Path, database_url: str) -> dict[str, str]:
    """The parent environment without any CELERY_* setting that could leak into a worker."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CELERY_", "TASK_RECORD", "REMAP_SIG"))
    }
    env.update(
        DATABASE_URL=database_url,
        WORKER_HEARTBEAT_FILE=str(tmp / "heartbeat"),
        WORKER_HEARTBEAT_INTERVAL="1",
        CELERY_SOFT_SHUTDOWN_TIMEOUT="5",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    return env
