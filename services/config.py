"""The service's configuration: read from the environment in one place and validated at start.

Every process (worker, beat, migrate, load, healthcheck) builds one ``Settings`` from the
environment. A bad value stops start-up with a message naming the variable, the value and what was
expected, so a typo in ``.env`` fails loudly instead of running with a silent default. All errors
are collected and reported together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from scaler.secret_files import file_variables

# kombu's Redis transport keeps one list per priority step; ten steps give every priority its own
# list. The scaler counts a queue as the bare key plus ``name + PRIORITY_SEP + str(step)`` for each
# non-zero step, so these two facts are shared with it from here.
PRIORITY_STEPS: list[int] = list(range(10))
PRIORITY_SEP = "\x06\x16"

# The five queues, one worker service per queue.
QUEUE_NAMES: tuple[str, ...] = ("default", "cpu_intensive", "io_intensive", "priority", "scheduled")

REDIS_SCHEMES = ("redis", "rediss")
BROKER_SCHEMES = (*REDIS_SCHEMES, "amqp", "amqps")
DATABASE_SCHEMES = ("postgresql", "postgres")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Only JSON: pickle (and yaml/msgpack with extensions) can execute code or surprise on load.
SERIALIZERS = ("json",)
# Stands in for a default derived from a variable that is itself invalid (already reported).
_PLACEHOLDER_REDIS = "redis://localhost:6379/0"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,64}$")
_QUEUE_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")

# Variables that carry a password (inside a URL or alone). Each may instead be given as a file,
# the official images' convention: ``X_FILE=/run/secrets/x`` sets X to that file's content, so a
# Docker (Swarm) secret never appears in a container's environment (``docker service inspect``).
SECRET_VARIABLES: tuple[str, ...] = (
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "TASK_RECORDS_REDIS_URL",
    "DATABASE_URL",
    "POSTGRES_APP_PASSWORD",
    "SCALER_REDIS_URL",
    "SCALER_TOKEN",
)

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more environment variables are invalid; the message names each of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Settings:
    """Validated settings for every process of the service."""

    broker_url: str
    result_backend: str
    records_redis_url: str
    database_url: str
    key_prefix: str
    queue_prefix: str
    visibility_timeout: int
    task_time_limit: int
    task_soft_time_limit: int
    result_expires: int
    max_tasks_per_child: int
    soft_shutdown_timeout: float
    db_pool_min: int
    db_pool_max: int
    db_connect_timeout: int
    records_limit: int
    record_max_chars: int
    worker_heartbeat_file: Path | None
    worker_heartbeat_interval: float
    health_check_interval: float
    log_level: str

    @property
    def broker_is_redis(self) -> bool:
        return urlsplit(self.broker_url).scheme in REDIS_SCHEMES

    def queue(self, name: str) -> str:
        """The broker-level name of one of the five queues (the queue prefix applied)."""
        if name not in QUEUE_NAMES:
            raise ValueError(f"queue={name!r}: expected one of {', '.join(QUEUE_NAMES)}")
        return f"{self.queue_prefix}{name}"


class _Reader:
    """Reads variables from one mapping and collects every problem instead of stopping at one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str, default: str | None) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def fail(self, name: str, value: object, expected: str) -> None:
        self.problems.append(f"{name}={value!r}: expected {expected}")

    def parsed(self, name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        value = self.raw(name, None)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            self.fail(name, value, expected)
            return default

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        expected = f"a whole number {bounds}"
        value = self.parsed(name, default, int, expected)
        if value < minimum or (maximum is not None and value > maximum):
            self.fail(name, self.raw(name, str(default)), expected)
            return default  # reported; the default keeps cross-checks from piling on
        return value

    def number(self, name: str, default: float, minimum: float, exclusive: bool = False) -> float:
        expected = f"a number {'>' if exclusive else '>='} {minimum}"
        value = self.parsed(name, default, float, expected)
        if value != value or value < minimum or (exclusive and value == minimum):  # NaN too
            self.fail(name, self.raw(name, str(default)), expected)
            return default
        return value

    def url(self, name: str, default: str | None, schemes: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        expected = f"a URL {' or '.join(s + '://' for s in schemes)}host[:port]/..."
        if value is None:
            self.fail(name, None, f"{expected} (required)")
            return ""
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a non-numeric port
        except ValueError:
            self.fail(name, _redact(value), expected)
            return value
        if parts.scheme not in schemes or not parts.hostname:
            self.fail(name, _redact(value), expected)
        elif parts.scheme in REDIS_SCHEMES and parts.path.strip("/") and not _is_db(parts.path):
            self.fail(name, _redact(value), f"{expected} with a database number as the path")
        elif parts.scheme in DATABASE_SCHEMES and not parts.path.strip("/"):
            self.fail(name, _redact(value), f"{expected} including the database name")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default) or default
        normalised = value.upper() if choices == LOG_LEVELS else value.lower()
        if normalised not in choices:
            self.fail(name, value, f"one of {', '.join(choices)}")
            return default
        return normalised

    def pattern(self, name: str, regex: re.Pattern[str], expected: str) -> str:
        value = self.raw(name, "") or ""
        if not regex.match(value):
            self.fail(name, value, expected)
            return ""
        return value


def with_file_variables(
    env: Mapping[str, str] | None = None, names: tuple[str, ...] = SECRET_VARIABLES
) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with every ``X_FILE`` of ``names`` read into
    ``X`` (scaler.secret_files); raises ConfigError naming each variable that is set twice or
    whose file is unusable."""
    resolved, problems = file_variables(os.environ if env is None else env, names)
    if problems:
        raise ConfigError(problems)
    return resolved


def _is_db(path: str) -> bool:
    return path.strip("/").isdigit()


def _redact(url: str) -> str:
    """The URL with its password hidden, for error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings; raise ConfigError naming every bad variable.

    A secret may come from a file: ``CELERY_BROKER_URL_FILE`` and the like (SECRET_VARIABLES).
    """
    source, file_problems = file_variables(os.environ if env is None else env, SECRET_VARIABLES)
    r = _Reader(source)

    broker_url = r.url("CELERY_BROKER_URL", "redis://localhost:6379/0", BROKER_SCHEMES)
    broker_ok = not r.problems
    broker_is_redis = urlsplit(broker_url).scheme in REDIS_SCHEMES
    # Defaults follow the broker; when the broker itself is bad, only that is reported.
    if not broker_ok:
        backend_default: str | None = _PLACEHOLDER_REDIS
    else:
        backend_default = broker_url if broker_is_redis else None
    result_backend = r.url("CELERY_RESULT_BACKEND", backend_default, REDIS_SCHEMES)
    backend_ok = broker_ok and not r.problems
    records_default = result_backend if backend_ok else _PLACEHOLDER_REDIS
    records_url = r.url("TASK_RECORDS_REDIS_URL", records_default, REDIS_SCHEMES)
    database_url = r.url(
        "DATABASE_URL", "postgresql://postgres@localhost:5432/postgres", DATABASE_SCHEMES
    )

    for name in ("CELERY_TASK_SERIALIZER", "CELERY_RESULT_SERIALIZER"):
        r.choice(name, "json", SERIALIZERS)
    accept = r.raw("CELERY_ACCEPT_CONTENT", "json") or "json"
    if [item.strip().lower() for item in accept.split(",")] != ["json"]:
        r.fail("CELERY_ACCEPT_CONTENT", accept, "json (only JSON content is accepted)")

    time_limit = r.integer("CELERY_TASK_TIME_LIMIT", 300, 1)
    soft_limit = r.integer("CELERY_TASK_SOFT_TIME_LIMIT", 270, 1)
    visibility = r.integer("CELERY_VISIBILITY_TIMEOUT", 900, 1)
    if soft_limit >= time_limit:
        r.fail(
            "CELERY_TASK_SOFT_TIME_LIMIT",
            soft_limit,
            f"less than CELERY_TASK_TIME_LIMIT ({time_limit}) so the task can clean up",
        )
    if visibility <= time_limit:
        r.fail(
            "CELERY_VISIBILITY_TIMEOUT",
            visibility,
            f"more than CELERY_TASK_TIME_LIMIT ({time_limit}); otherwise Redis redelivers "
            "a task that is still running and it runs twice",
        )

    pool_min = r.integer("DB_POOL_MIN", 1, 0, 100)
    pool_max = r.integer("DB_POOL_MAX", 4, 1, 100)
    if pool_min > pool_max:
        r.fail("DB_POOL_MIN", pool_min, f"at most DB_POOL_MAX ({pool_max})")

    heartbeat_raw = r.raw("WORKER_HEARTBEAT_FILE", None)
    heartbeat_file = Path(heartbeat_raw) if heartbeat_raw else None
    if heartbeat_file is not None and not heartbeat_file.parent.is_dir():
        r.fail("WORKER_HEARTBEAT_FILE", heartbeat_raw, "a file path in an existing directory")

    settings = Settings(
        broker_url=broker_url,
        result_backend=result_backend,
        records_redis_url=records_url,
        database_url=database_url,
        key_prefix=r.pattern(
            "CELERY_KEY_PREFIX", _PREFIX_RE, "up to 64 of A-Z a-z 0-9 _ . : - (or empty)"
        ),
        queue_prefix=r.pattern(
            "CELERY_QUEUE_PREFIX", _QUEUE_PREFIX_RE, "up to 64 of A-Z a-z 0-9 _ . - (or empty)"
        ),
        visibility_timeout=visibility,
        task_time_limit=time_limit,
        task_soft_time_limit=soft_limit,
        result_expires=r.integer("CELERY_RESULT_EXPIRES", 3600, 1),
        max_tasks_per_child=r.integer("CELERY_MAX_TASKS_PER_CHILD", 1000, 1),
        soft_shutdown_timeout=r.number("CELERY_SOFT_SHUTDOWN_TIMEOUT", 10.0, 0.0),
        db_pool_min=pool_min,
        db_pool_max=pool_max,
        db_connect_timeout=r.integer("DB_CONNECT_TIMEOUT", 5, 1, 300),
        records_limit=r.integer("TASK_RECORDS_LIMIT", 1000, 1, 1_000_000),
        record_max_chars=r.integer("TASK_RECORD_MAX_CHARS", 2000, 100, 1_000_000),
        worker_heartbeat_file=heartbeat_file,
        worker_heartbeat_interval=r.number("WORKER_HEARTBEAT_INTERVAL", 10.0, 0.0, exclusive=True),
        health_check_interval=r.number("HEALTH_CHECK_INTERVAL", 300.0, 0.0, exclusive=True),
        log_level=r.choice("LOG_LEVEL", "INFO", LOG_LEVELS),
    )
    # Last, so that a file's problem does not hide the defaults' cross-checks above.
    problems = file_problems + r.problems
    if problems:
        raise ConfigError(problems)
    return settings
