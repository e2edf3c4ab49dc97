"""Configuration: defaults, and every bad value rejected with its variable's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services import priorities
from services.application import create_app
from services.config import PRIORITY_SEP, PRIORITY_STEPS, ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_safe() -> None:
    settings = load_settings({})
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.result_backend == settings.broker_url
    assert settings.records_redis_url == settings.broker_url
    assert settings.visibility_timeout > settings.task_time_limit > settings.task_soft_time_limit
    assert settings.records_limit == 1000
    assert settings.queue("io_intensive") == "io_intensive"


def test_app_configuration_carries_the_reliability_settings() -> None:
    app = create_app(load_settings({"CELERY_KEY_PREFIX": "p:"}))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.timezone == "UTC" and conf.enable_utc
    assert conf.broker_connection_retry_on_startup
    assert conf.worker_send_task_events and conf.task_send_sent_event
    options = conf.broker_transport_options
    assert options["priority_steps"] == PRIORITY_STEPS == list(range(10))
    assert options["sep"] == PRIORITY_SEP
    assert options["queue_order_strategy"] == "priority"
    assert options["global_keyprefix"] == "p:"
    assert options["visibility_timeout"] > conf.task_time_limit
    assert {q.name for q in conf.task_queues} == {
        "default",
        "cpu_intensive",
        "io_intensive",
        "priority",
        "scheduled",
    }
    assert all(q.queue_arguments == {"x-max-priority": 10} for q in conf.task_queues)


def test_result_backend_is_required_with_rabbitmq() -> None:
    with pytest.raises(ConfigError, match=r"CELERY_RESULT_BACKEND=None: expected .*required"):
        load_settings({"CELERY_BROKER_URL": "amqp://guest:guest@localhost:5672//"})
    settings = load_settings(
        {
            "CELERY_BROKER_URL": "amqp://guest:guest@localhost:5672//",
            "CELERY_RESULT_BACKEND": "redis://localhost:6379/1",
        }
    )
    assert not settings.broker_is_redis


BAD_VALUES = [
    ("CELERY_BROKER_URL", "http://localhost:6379/0", "redis://"),
    ("CELERY_BROKER_URL", "redis://", "redis://"),
    ("CELERY_BROKER_URL", "redis://localhost:notaport/0", "redis://"),
    ("CELERY_BROKER_URL", "redis://localhost:6379/zero", "database number"),
    ("CELERY_RESULT_BACKEND", "db+postgresql://x/y", "redis://"),
    ("TASK_RECORDS_REDIS_URL", "localhost:6379", "redis://"),
    ("DATABASE_URL", "mysql://u:p@h/db", "postgresql://"),
    ("DATABASE_URL", "postgresql://u:p@h:5432", "database name"),
    ("CELERY_TASK_SERIALIZER", "pickle", "json"),
    ("CELERY_RESULT_SERIALIZER", "yaml", "json"),
    ("CELERY_ACCEPT_CONTENT", "json,pickle", "json"),
    ("CELERY_KEY_PREFIX", "bad prefix!", "A-Z"),
    ("CELERY_QUEUE_PREFIX", "a/b", "A-Z"),
    ("CELERY_VISIBILITY_TIMEOUT", "ten", "whole number"),
    ("CELERY_VISIBILITY_TIMEOUT", "100", "more than CELERY_TASK_TIME_LIMIT"),
    ("CELERY_TASK_TIME_LIMIT", "0", ">= 1"),
    ("CELERY_TASK_TIME_LIMIT", "1.5", "whole number"),
    ("CELERY_TASK_SOFT_TIME_LIMIT", "300", "less than CELERY_TASK_TIME_LIMIT"),
    ("CELERY_RESULT_EXPIRES", "-1", ">= 1"),
    ("CELERY_MAX_TASKS_PER_CHILD", "many", "whole number"),
    ("CELERY_SOFT_SHUTDOWN_TIMEOUT", "nan", "number >= 0"),
    ("DB_POOL_MIN", "x", "whole number"),
    ("DB_POOL_MAX", "0", "between 1 and 100"),
    ("DB_CONNECT_TIMEOUT", "0", "between 1 and 300"),
    ("TASK_RECORDS_LIMIT", "0", "between 1 and"),
    ("TASK_RECORD_MAX_CHARS", "10", "between 100 and"),
    ("WORKER_HEARTBEAT_FILE", "/no/such/dir/heartbeat", "existing directory"),
    ("WORKER_HEARTBEAT_INTERVAL", "0", "number > 0"),
    ("HEALTH_CHECK_INTERVAL", "soon", "number > 0"),
    ("LOG_LEVEL", "LOUD", "one of DEBUG"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VALUES)
def test_bad_value_is_rejected_naming_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert f"{name}=" in message
    assert expected in message
    assert len(caught.value.problems) == 1, caught.value.problems


def test_pool_min_above_max_is_rejected() -> None:
    with pytest.raises(ConfigError, match="DB_POOL_MIN=5: expected at most DB_POOL_MAX"):
        load_settings({"DB_POOL_MIN": "5", "DB_POOL_MAX": "2"})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"LOG_LEVEL": "x", "DB_POOL_MAX": "y", "CELERY_TASK_SERIALIZER": "pickle"})
    assert len(caught.value.problems) == 3


def test_password_is_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CELERY_BROKER_URL": "http://user:s3cret@host:1/0"})
    assert "s3cret" not in str(caught.value)


def test_worker_refuses_to_start_with_a_bad_value() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "services.celery_app", "worker"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CELERY_TASK_TIME_LIMIT": "soon"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "CELERY_TASK_TIME_LIMIT='soon': expected a whole number" in proc.stderr


@pytest.mark.parametrize("value", [-1, 10, 1.5, "9", True])
def test_priority_outside_0_to_9_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match=r"priority=.*expected a whole number from 0 to 9"):
        priorities.to_broker(value, broker_is_redis=True)  # type: ignore[arg-type]


def test_priority_is_mirrored_for_redis_only() -> None:
    assert priorities.to_broker(9, broker_is_redis=True) == 0
    assert priorities.to_broker(0, broker_is_redis=True) == 9
    assert priorities.to_broker(9, broker_is_redis=False) == 9
    assert priorities.to_broker(None, broker_is_redis=False) == priorities.DEFAULT_PRIORITY
    for p in range(10):
        assert priorities.from_broker(priorities.to_broker(p, True), True) == p
