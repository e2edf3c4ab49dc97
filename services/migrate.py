"""Schema migration: plain SQL files applied once each, safe to run from several places at once.

``python -m services.migrate`` waits for PostgreSQL (until a deadline: in Compose it may start
before the database accepts connections), takes a session advisory lock so concurrent runners
serialise, and applies each ``migrations/NNNN_name.sql`` not yet in ``schema_migrations``, each in
its own transaction together with its record. Then, when ``POSTGRES_APP_PASSWORD`` is set, it
makes sure the tasks' own role exists with DML rights only (services.db_roles): the migrations run
as the owner, the tasks never do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psycopg2
import psycopg2.extensions

from services.config import ConfigError, load_settings, with_file_variables
from services.db_roles import AppRole, RoleError, ensure_app_role

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant: every runner of this project's migrations takes the same lock.
ADVISORY_LOCK_KEY = 0x5EC1E7A
SCHEMA_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


class Migration(NamedTuple):
    version: str
    sql: str


def available_migrations() -> list[Migration]:
    """The packaged SQL files (installed beside this module as package data), in name order."""
    files = sorted(MIGRATIONS_DIR.glob("*.sql"))
    return [Migration(path.name.removesuffix(".sql"), path.read_text()) for path in files]


def connect_until(database_url: str, deadline_s: float) -> psycopg2.extensions.connection:
    """Connect, retrying until the deadline; the last error is in the exception."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return psycopg2.connect(database_url, connect_timeout=5)
        except psycopg2.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"PostgreSQL not reachable within {deadline_s:g}s: {exc}".strip()
                ) from exc
            log.info("waiting for PostgreSQL: %s", str(exc).strip())
            time.sleep(0.5)


def migrate(
    database_url: str, deadline_s: float = 60.0, app_role: AppRole | None = None
) -> list[str]:
    """Apply the pending migrations, then grant ``app_role`` (if any) the tasks' DML.

    Returns the versions applied by this call. The role step runs every time (idempotent), so a
    rotated password or a table added by hand gets its grants without a new migration.
    """
    conn = connect_until(database_url, deadline_s)
    applied: list[str] = []
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            conn.autocommit = False
            with conn, conn.cursor() as cur:
                cur.execute(SCHEMA_TABLE_SQL)
            for migration in available_migrations():
                with conn, conn.cursor() as cur:
                    cur.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                    )
                    if cur.fetchone() is not None:
                        continue
                    cur.execute(migration.sql)
                    cur.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (migration.version,)
                    )
                applied.append(migration.version)
                log.info("applied migration %s", migration.version)
            if app_role is not None:
                ensure_app_role(conn, app_role)
        finally:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    finally:
        conn.close()
    return applied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deadline", type=float, default=60.0, help="seconds to wait for PostgreSQL"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = load_settings()
        # POSTGRES_APP_PASSWORD_FILE too (a Swarm secret): with_file_variables reads it.
        app_role = AppRole.from_env(with_file_variables(os.environ))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        applied = migrate(settings.database_url, args.deadline, app_role)
    except (TimeoutError, RoleError, psycopg2.Error) as exc:
        print(f"migration failed: {exc}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    if app_role is not None:
        print(f"app role {app_role.name}: DML on the application's tables, nothing more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
