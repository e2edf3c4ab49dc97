"""`python -m services.wait_migrated`, which the Swarm stack's workers and beat run before they
start (Swarm has no depends_on): not ready until the app role can log in and write every table the
packaged migrations create; ready after `migrate`, against a real PostgreSQL."""

from __future__ import annotations

import secrets
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2

from services.db_roles import AppRole
from services.migrate import migrate
from services.wait_migrated import expected_tables, missing_tables


def _url(base: str, database: str, user: str | None = None, password: str = "") -> str:
    parts = urlsplit(base)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


def test_ready_only_once_migrate_has_run(backing: Any) -> None:
    name = f"t_wait_{uuid.uuid4().hex[:10]}"
    role = AppRole(f"t_app_{uuid.uuid4().hex[:10]}", secrets.token_hex(16))
    admin = psycopg2.connect(backing.admin_database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    owner_url = _url(backing.admin_database_url, name)
    app_url = _url(backing.admin_database_url, name, role.name, role.password)
    try:
        before = missing_tables(app_url)
        assert isinstance(before, str) and role.name in before  # the role does not exist yet
        migrate(owner_url, deadline_s=30, app_role=role)
        assert "task_effects" in expected_tables() and "schema_migrations" not in expected_tables()
        assert missing_tables(app_url) == set()
        owner = psycopg2.connect(owner_url)
        owner.autocommit = True
        with owner.cursor() as cur:
            cur.execute("REVOKE INSERT ON task_effects FROM " + f'"{role.name}"')
        owner.close()
        assert missing_tables(app_url) == {"task_effects"}
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'DROP ROLE IF EXISTS "{role.name}"')
        admin.close()
