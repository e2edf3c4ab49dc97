"""The application's database role: the tasks connect as it, with DML on the app's tables only.

The migration step connects as the owner of the schema (``POSTGRES_USER``) and, after applying the
migrations, makes sure the app role (``POSTGRES_APP_USER``) exists with its current password and
exactly the privileges the tasks need: SELECT, INSERT, UPDATE, DELETE on the app's tables and USAGE
on its sequences, now and for tables later migrations create (default privileges). It owns nothing
and may create nothing, so a task, or code that runs inside a worker, cannot drop, alter or
truncate a table, read the migration history, or become another role. Every statement is
idempotent: running the step again changes nothing but a rotated password.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from services.config import ConfigError

log = logging.getLogger(__name__)

# Unquoted PostgreSQL identifiers (at most 63 bytes), as check-env.sh accepts them.
_ROLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
# Attributes the app role must not hold; a role that exists with one of them is corrected.
_FORBIDDEN_ATTRIBUTES = {
    "rolsuper": "NOSUPERUSER",
    "rolcreatedb": "NOCREATEDB",
    "rolcreaterole": "NOCREATEROLE",
    "rolreplication": "NOREPLICATION",
    "rolbypassrls": "NOBYPASSRLS",
}
# The migrations' own bookkeeping: the tasks have no business reading or writing it.
PRIVATE_TABLES = ("schema_migrations",)


class RoleError(RuntimeError):
    """The app role cannot be what it must be (e.g. it is the owner, or a member of it)."""


@dataclass(frozen=True)
class AppRole:
    """The login role of the tasks: a name and its password."""

    name: str
    password: str

    def __repr__(self) -> str:  # the password never reaches a log line
        return f"AppRole(name={self.name!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AppRole | None:
        """From POSTGRES_APP_USER (default ``celery_app``) and POSTGRES_APP_PASSWORD.

        None when POSTGRES_APP_PASSWORD is unset: the schema is then migrated and no role is
        managed (a developer's database, the test suite's own).
        """
        password = (env.get("POSTGRES_APP_PASSWORD") or "").strip()
        name = (env.get("POSTGRES_APP_USER") or "").strip() or "celery_app"
        problems = []
        if not _ROLE_RE.match(name):
            problems.append(
                f"POSTGRES_APP_USER={name!r}: expected a PostgreSQL identifier "
                "(a letter or '_', then letters, digits or '_'; at most 63)"
            )
        if not password:
            if env.get("POSTGRES_APP_USER", "").strip():
                problems.append(
                    "POSTGRES_APP_PASSWORD is empty: expected the app role's password "
                    "(make up generates it into .env)"
                )
            else:
                return None
        if problems:
            raise ConfigError(problems)
        return cls(name, password)


def ensure_app_role(conn: psycopg2.extensions.connection, role: AppRole) -> None:
    """Create or update the app role and grant it the tasks' DML, in one transaction.

    Run by the schema's owner after the migrations, under the migration lock. Refuses (RoleError)
    when the app role is the connected user or a member of it: it would inherit ownership, which is
    what it exists to avoid.
    """
    ident = sql.Identifier(role.name)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, current_database(), current_schema()")
        owner, database, schema = _one(cur)
        if schema is None:
            raise RoleError(
                f"no schema to grant on: the search_path of {owner!r} in {database!r} names none "
                "that exists"
            )
        if role.name == owner:
            raise RoleError(
                f"POSTGRES_APP_USER={role.name!r} is the user the migrations run as: expected a "
                "role of its own, distinct from POSTGRES_USER"
            )
        cur.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = %s",
            (role.name,),
        )
        row = cur.fetchone()
        # The verifier (SCRAM with the server's password_encryption), never the clear text, is
        # what the statement carries: a server logging statements logs no password.
        verifier = psycopg2.extensions.encrypt_password(role.password, role.name, conn)
        if row is None:
            cur.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOINHERIT PASSWORD %s").format(ident), (verifier,)
            )
            log.info("created the app role %s", role.name)
        else:
            held = dict(zip(_FORBIDDEN_ATTRIBUTES, row, strict=True))
            fixes = [_FORBIDDEN_ATTRIBUTES[name] for name, on in held.items() if on]
            attributes = sql.SQL(" ").join(sql.SQL(a) for a in ["LOGIN", "NOINHERIT", *fixes])
            cur.execute(
                sql.SQL("ALTER ROLE {} {} PASSWORD %s").format(ident, attributes), (verifier,)
            )
            if fixes:
                log.warning("the app role %s had %s: removed", role.name, ", ".join(fixes))
        cur.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (role.name, owner))
        (member,) = _one(cur)
        if member:
            raise RoleError(
                f"POSTGRES_APP_USER={role.name!r} is a member of {owner!r}, the owner of the "
                f"schema: expected a role that holds none of the owner's rights "
                f"(REVOKE {owner} FROM {role.name})"
            )
        _grant(cur, role.name, owner, database, schema)
    log.info("app role %s: DML on the tables of %s.%s", role.name, database, schema)


def _one(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None, "the query returns one row"
    return tuple(row)


def _grant(
    cur: psycopg2.extensions.cursor, role: str, owner: str, database: str, schema: str
) -> None:
    ident, schema_ident = sql.Identifier(role), sql.Identifier(schema)
    dml = sql.SQL(", ").join(sql.SQL(p) for p in TABLE_PRIVILEGES)
    statements = [
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), ident),
        # Before PostgreSQL 15 every role may create objects in `public`: not the app role.
        sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC").format(schema_ident),
        sql.SQL("REVOKE CREATE ON SCHEMA {} FROM {}").format(schema_ident, ident),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema_ident, ident),
        sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(dml, schema_ident, ident),
        sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(schema_ident, ident),
        # Tables and sequences the owner creates later (the next migration) come with the same.
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON TABLES TO {}"
        ).format(sql.Identifier(owner), schema_ident, dml, ident),
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT USAGE ON SEQUENCES TO {}"
        ).format(sql.Identifier(owner), schema_ident, ident),
    ]
    statements += [
        sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(sql.Identifier(schema, table), ident)
        for table in PRIVATE_TABLES
    ]
    for statement in statements:
        cur.execute(statement)
