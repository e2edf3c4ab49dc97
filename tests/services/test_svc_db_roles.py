"""The tasks' database role (services.db_roles) on a real PostgreSQL: DML only, no DDL, no owner.

A database and a role of this module's own (roles are cluster-wide, so the name is unique), both
dropped afterwards. The migrations run as the suite's admin user, the owner here, as
`python -m services.migrate` runs as POSTGRES_USER in the stack.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.errors
import pytest

from services.db import DatabasePool
from services.db_roles import AppRole, RoleError
from services.effects import apply_once
from services.migrate import migrate
from services.tasks.cleanup import delete_expired_sessions
from services.tasks.reports import aggregate

ROOT = Path(__file__).resolve().parents[2]


def with_user(url: str, user: str, password: str, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"
    path = f"/{database}" if database else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture(scope="module")
def roles_db(backing: Any) -> Iterator[tuple[str, AppRole]]:
    """(owner URL, app role) on a fresh database, migrated with the role."""
    name = f"t_roles_{uuid.uuid4().hex[:10]}"
    role = AppRole(f"t_app_{uuid.uuid4().hex[:10]}", secrets.token_hex(16))
    admin = psycopg2.connect(backing.admin_database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    owner_url = with_database(backing.admin_database_url, name)
    try:
        migrate(owner_url, deadline_s=30, app_role=role)
        yield owner_url, role
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'DROP ROLE IF EXISTS "{role.name}"')
        admin.close()


def as_app(owner_url: str, role: AppRole) -> psycopg2.extensions.connection:
    return psycopg2.connect(with_user(owner_url, role.name, role.password), connect_timeout=5)


def refused(conn: psycopg2.extensions.connection, statement: str) -> str:
    """Run one statement as the app role; it must fail for want of privilege. Returns the error."""
    with conn.cursor() as cur:
        try:
            cur.execute(statement)
        except psycopg2.errors.InsufficientPrivilege as exc:
            conn.rollback()
            return str(exc)
    conn.rollback()
    raise AssertionError(f"the app role was allowed: {statement}")


def stored_password(cur: psycopg2.extensions.cursor, role: str) -> str:
    cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
    row = cur.fetchone()
    assert row is not None, f"no role {role}"
    return str(row[0])


def test_the_app_role_runs_the_tasks_dml(roles_db: tuple[str, AppRole]) -> None:
    owner_url, role = roles_db
    pool = DatabasePool(with_user(owner_url, role.name, role.password), 1, 2)
    try:
        context = {"task_id": f"role-{uuid.uuid4().hex}", "hostname": "h", "queue": "default"}
        # The tasks' own code paths: the effect claim (INSERT ... RETURNING, SELECT, UPDATE),
        # the cleanup's DELETE and the report's SELECT + upsert.
        first = apply_once(pool, context, "t.cleanup", delete_expired_sessions)
        again = apply_once(pool, context, "t.cleanup", delete_expired_sessions)
        assert first["deleted"] == 0 and again["duplicate"] is True
        report = {**context, "task_id": f"role-{uuid.uuid4().hex}"}
        day = date(2020, 1, 2)
        done = apply_once(pool, report, "t.report", lambda cur: aggregate(cur, day, "x"))
        assert done["report_date"] == day.isoformat()
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT task_id FROM daily_reports WHERE report_date = %s", (day,))
            assert cur.fetchone() == ("x",)
            cur.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (role.name, False)
    finally:
        pool.close()


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE task_effects",
        "TRUNCATE task_effects",
        "ALTER TABLE task_effects ADD COLUMN x int",
        "CREATE TABLE intruder (x int)",
        "CREATE INDEX intruder ON task_effects (hostname)",
        "SELECT * FROM schema_migrations",
        "DELETE FROM schema_migrations",
        "CREATE ROLE intruder",
    ],
)
def test_the_app_role_cannot_change_the_schema(
    roles_db: tuple[str, AppRole], statement: str
) -> None:
    owner_url, role = roles_db
    conn = as_app(owner_url, role)
    try:
        message = refused(conn, statement)
        assert "permission denied" in message or "must be owner" in message, message
    finally:
        conn.close()


def test_migrations_as_owner_stay_idempotent_and_future_tables_get_dml(
    roles_db: tuple[str, AppRole],
) -> None:
    owner_url, role = roles_db
    rotated = AppRole(role.name, secrets.token_hex(16))
    owner = psycopg2.connect(owner_url)
    owner.autocommit = True
    try:
        with owner.cursor() as cur:
            before = stored_password(cur, role.name)
            assert before.startswith("SCRAM-SHA-256$"), "stored as a verifier, not in clear"
            # Again, as the stack's migrate service does on every `up`: nothing pending, the role
            # kept, the new password in force.
            assert migrate(owner_url, deadline_s=30, app_role=rotated) == []
            after = stored_password(cur, role.name)
            assert after != before and after.startswith("SCRAM-SHA-256$")
            # A table a later migration creates (as the owner): default privileges give the app
            # role its DML, with no grant in the migration.
            cur.execute("CREATE TABLE later (id bigserial PRIMARY KEY, v text)")
        app = as_app(owner_url, rotated)
        try:
            with app, app.cursor() as cur:
                cur.execute("INSERT INTO later (v) VALUES ('x') RETURNING id")
                cur.execute("UPDATE later SET v = 'y'")
                cur.execute("DELETE FROM later")
            refused(app, "DROP TABLE later")
        finally:
            app.close()
    finally:
        with owner.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS later")
        owner.close()
        migrate(owner_url, deadline_s=30, app_role=role)  # the module's password again


def test_the_owner_cannot_be_the_app_role(roles_db: tuple[str, AppRole]) -> None:
    owner_url, _ = roles_db
    owner = urlsplit(owner_url).username or ""
    with pytest.raises(RoleError, match=f"POSTGRES_APP_USER='{owner}' is the user"):
        migrate(owner_url, deadline_s=30, app_role=AppRole(owner, "x" * 32))
    env = {**os.environ, "DATABASE_URL": owner_url, "POSTGRES_APP_USER": "bad-name"}
    env["POSTGRES_APP_PASSWORD"] = "p" * 32
    proc = subprocess.run(
        [sys.executable, "-m", "services.migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "POSTGRES_APP_USER='bad-name'" in proc.stderr, proc.stderr
