"""Secrets from files (``X_FILE``, the official images' convention), as Docker Swarm mounts them.

The Swarm stack (compose/stack.yaml) gives no password in any environment: every secret-bearing
variable arrives as ``X_FILE=/run/secrets/...``. These tests pin the contract: the file's content
is the value (one trailing newline dropped), setting both X and X_FILE is refused naming both, and
an unusable file is refused naming the variable and the path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scaler.api import HttpSettings
from scaler.cli import scaler_redis_url
from services.config import SECRET_VARIABLES, ConfigError, load_settings, with_file_variables

BROKER = "redis://worker:s3cret-from-file@redis:6379/0"


def _secret(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def test_every_url_of_the_settings_can_come_from_a_file(tmp_path: Path) -> None:
    env = {
        "CELERY_BROKER_URL_FILE": _secret(tmp_path, "broker", BROKER + "\n"),
        "CELERY_RESULT_BACKEND_FILE": _secret(tmp_path, "backend", "redis://worker:x@redis/1"),
        "DATABASE_URL_FILE": _secret(
            tmp_path, "db", "postgresql://app:pw@postgres:5432/celery\r\n"
        ),
    }
    settings = load_settings(env)
    assert settings.broker_url == BROKER  # the newline printf/echo added is not part of it
    assert settings.result_backend == "redis://worker:x@redis/1"
    assert settings.records_redis_url == "redis://worker:x@redis/1"  # its default follows
    assert settings.database_url == "postgresql://app:pw@postgres:5432/celery"


def test_a_file_value_is_validated_like_an_environment_value(tmp_path: Path) -> None:
    env = {"CELERY_BROKER_URL_FILE": _secret(tmp_path, "broker", "http://nope:pw@redis/0")}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert "CELERY_BROKER_URL=" in str(info.value)
    assert "pw" not in str(info.value)  # the password stays redacted


def test_both_the_variable_and_its_file_is_an_error_naming_both(tmp_path: Path) -> None:
    path = _secret(tmp_path, "db", "postgresql://app:pw@postgres/celery")
    env = {"DATABASE_URL": "postgresql://app:other@postgres/celery", "DATABASE_URL_FILE": path}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert len(info.value.problems) == 1
    assert "DATABASE_URL and DATABASE_URL_FILE" in info.value.problems[0]
    assert path in info.value.problems[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "expected a readable file"),
        ("", "the file is empty"),
        ("\n", "the file is empty"),
        (b"\xff\xfe", "expected UTF-8 text"),
        ("x" * 70_000, "at most 65536 bytes"),
    ],
)
def test_an_unusable_file_names_the_variable_and_the_path(
    tmp_path: Path, content: str | bytes | None, expected: str
) -> None:
    path = str(tmp_path / "missing") if content is None else _secret(tmp_path, "s", content)
    with pytest.raises(ConfigError) as info:
        load_settings({"CELERY_RESULT_BACKEND_FILE": path})
    (problem,) = info.value.problems
    assert problem.startswith(f"CELERY_RESULT_BACKEND_FILE={path!r}")
    assert expected in problem


def test_file_problems_are_reported_with_the_other_problems(tmp_path: Path) -> None:
    env = {"DATABASE_URL_FILE": str(tmp_path / "missing"), "DB_POOL_MAX": "zero"}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    text = str(info.value)
    assert "DATABASE_URL_FILE=" in text and "DB_POOL_MAX='zero'" in text


def test_an_empty_file_variable_means_unset(tmp_path: Path) -> None:
    resolved = with_file_variables({"SCALER_TOKEN": "t" * 32, "SCALER_TOKEN_FILE": " "})
    assert resolved["SCALER_TOKEN"] == "t" * 32


def test_only_secret_bearing_variables_are_read_from_files(tmp_path: Path) -> None:
    path = _secret(tmp_path, "level", "DEBUG")
    assert with_file_variables({"LOG_LEVEL_FILE": path}).get("LOG_LEVEL") is None
    assert "POSTGRES_APP_PASSWORD" in SECRET_VARIABLES and "SCALER_TOKEN" in SECRET_VARIABLES


def test_the_scaler_token_and_redis_url_from_files(tmp_path: Path) -> None:
    token = "0123456789abcdef0123456789abcdef"
    settings = HttpSettings.from_env({"SCALER_TOKEN_FILE": _secret(tmp_path, "t", token + "\n")})
    assert settings.token == token
    with pytest.raises(ValueError, match="SCALER_TOKEN and SCALER_TOKEN_FILE"):
        HttpSettings.from_env({"SCALER_TOKEN": token, "SCALER_TOKEN_FILE": str(tmp_path / "t")})

    class _Conf:
        broker_url = "amqp://guest@rabbit//"
        result_backend = None

    class _App:
        conf = _Conf()

    url = "redis://scaler:pw@redis:6379/0"
    env = {"SCALER_REDIS_URL_FILE": _secret(tmp_path, "r", url)}
    assert scaler_redis_url(_App(), env) == url
    with pytest.raises(SystemExit, match="SCALER_REDIS_URL_FILE="):
        scaler_redis_url(_App(), {"SCALER_REDIS_URL_FILE": str(tmp_path / "none")})
