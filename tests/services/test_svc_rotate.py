"""`make rotate-db-owner`'s pieces against a real PostgreSQL: the SCRAM verifier it sends in
place of the password logs a role in with that password and no other, and the env file is
rewritten in place of one line, its permissions kept. The whole target runs on a real stack in
tests/e2e/test_stack_backup.py."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from services.rotate import new_password, scram_verifier, set_in_env_file


def test_the_verifier_logs_in_with_its_password_only(backing: Any) -> None:
    admin_url: str = backing.admin_database_url
    role = f"rot_{uuid.uuid4().hex[:8]}"
    password = new_password()
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (scram_verifier(password),))
            cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
            row = cur.fetchone()
        assert row is not None
        stored = str(row[0])
        assert stored.startswith("SCRAM-SHA-256$4096:") and password not in stored
        parts = urlsplit(admin_url)

        def login(secret: str) -> None:
            netloc = f"{role}:{secret}@{parts.hostname}:{parts.port}"
            psycopg2.connect(urlunsplit(parts._replace(netloc=netloc))).close()

        login(password)
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            login(new_password())
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def test_the_env_file_changes_in_one_line_and_keeps_its_mode(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# secrets\nPOSTGRES_USER=celery\nPOSTGRES_PASSWORD=old\nOTHER=x=y\n")
    os.chmod(env, 0o600)
    set_in_env_file(env, "POSTGRES_PASSWORD", "new")
    assert env.read_text() == "# secrets\nPOSTGRES_USER=celery\nPOSTGRES_PASSWORD=new\nOTHER=x=y\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    set_in_env_file(env, "SECRETS_DIGEST", "abc")
    assert env.read_text().endswith("OTHER=x=y\nSECRETS_DIGEST=abc\n")
    assert [p.name for p in tmp_path.iterdir()] == [".env"], "no temporary file left"
