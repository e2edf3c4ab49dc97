"""Wait until the schema this image ships is applied, then exit 0 (non-zero at the deadline).

Docker Swarm has no ``depends_on``: on ``docker stack deploy`` the workers and beat start beside
the one-shot ``migrate`` service, not after it. compose/stack.yaml runs this before each of them
(``python -m services.wait_migrated && exec start-worker.sh``) so that no task runs against a
database whose tables or app role do not exist yet. Ready means: the app role can log in (migrate
creates it after the migrations) and may write every table the migrations packaged in this image
create. (A migration that only changes columns is not seen: that is the limit of what the app
role may read.) Past the deadline it exits 1 and Swarm's ``on-failure`` policy retries.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

import psycopg2

from services.config import ConfigError, load_settings
from services.db_roles import PRIVATE_TABLES
from services.migrate import available_migrations

log = logging.getLogger("services.wait_migrated")


_CREATE_TABLE = re.compile(
    r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE
)


def expected_tables() -> set[str]:
    """The tables this image's migrations create that the app role works on."""
    names = {
        match.group(1).lower()
        for migration in available_migrations()
        for match in _CREATE_TABLE.finditer(migration.sql)
    }
    return names - set(PRIVATE_TABLES)


def missing_tables(database_url: str) -> set[str] | str:
    """The expected tables the app role cannot yet write, or why the database cannot tell yet.

    The app role may not read ``schema_migrations`` (a private table), so readiness is read from
    the catalogs: the role logs in (migrate creates it after the migrations) and holds INSERT on
    every table the packaged migrations create.
    """
    wanted = sorted(expected_tables())
    try:
        conn = psycopg2.connect(database_url, connect_timeout=5)
    except psycopg2.Error as exc:
        return str(exc).strip() or type(exc).__name__
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL"
                " OR NOT has_table_privilege(t, 'INSERT')",
                (wanted,),
            )
            return {row[0] for row in cur.fetchall()}
    except psycopg2.Error as exc:
        return str(exc).strip() or type(exc).__name__
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds to wait")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.deadline
    while True:
        missing = missing_tables(settings.database_url)
        if missing == set():
            return 0
        why = missing if isinstance(missing, str) else f"tables not ready yet: {sorted(missing)}"
        if time.monotonic() >= deadline:
            print(
                f"wait_migrated: schema not ready after {args.deadline:g}s: {why}", file=sys.stderr
            )
            return 1
        log.info("waiting for the migrate service: %s", why)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
