"""Rotate PostgreSQL's owner password on a running stack (``make rotate-db-owner``).

Every other secret rotates by editing the env file and running ``make up``: the secret files are
rewritten and the containers that read them recreated (SECRETS_DIGEST), and ``migrate`` sets the
app role's password again. The owner's password is different: PostgreSQL's image sets it only
when it creates the data directory, so a new ``POSTGRES_PASSWORD`` in the env file alone locks
``migrate`` and ``make backup`` out. This changes it in the database first (``ALTER ROLE``, as the
owner, over the password the running container has), and only then in the env file; the Makefile
target then rewrites the secret files and recreates what reads them.

The new password reaches ``psql`` on its standard input, never a command line (``ps``); a failure
before the database changed changes nothing, and one after it (the env file could not be
written) prints the new password so the operator can put it in the env file by hand.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

from services.backup import Stack, StepFailed

NAME = "POSTGRES_PASSWORD"
# What psql gets on stdin: a SCRAM verifier computed here, never the clear text (as
# services.db_roles does for the app role), so no server log or statement view can show it.
ALTER = "ALTER ROLE CURRENT_USER PASSWORD '{verifier}';\n"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{24,128}$")
SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def new_password() -> str:
    return secrets.token_hex(24)


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (RFC 5802/7677, as libpq's
    PQencryptPasswordConn makes it; an ASCII password needs no SASLprep)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def set_in_env_file(path: Path, name: str, value: str) -> None:
    """Replace ``name``'s line (or add it) in ``path``, atomically, keeping its permissions."""
    lines = path.read_text().splitlines(keepends=True)
    found = False
    for i, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == name:
            lines[i] = f"{name}={value}\n"
            found = True
    if not found:
        lines.append(f"{name}={value}\n")
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.writelines(lines)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rotate_db_owner(stack: Stack, password: str) -> None:
    """``ALTER ROLE`` the owner to ``password`` on the running stack, then the env file."""
    if not _TOKEN.match(password):
        raise ValueError("the new password: expected 24 to 128 of [A-Za-z0-9_-]")
    with tempfile.TemporaryFile() as sql:  # 0600, unlinked: the statement reaches psql's stdin
        sql.write(ALTER.format(verifier=scram_verifier(password)).encode())
        sql.seek(0)
        stack.run(
            "alter role",
            ["exec", "-T", "postgres", "sh", "-c",
             'PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")" psql -h 127.0.0.1 -v ON_ERROR_STOP=1'
             ' -X -q -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f -'],
            stdin=sql,
            timeout=120,
        )  # fmt: skip
    try:
        set_in_env_file(stack.env_file, NAME, password)
    except OSError as exc:
        print(
            f"rotate: the database has the new owner password but {stack.env_file} could not be "
            f"written ({exc}); set {NAME}={password} in it by hand, then run make up",
            file=sys.stderr,
        )
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("db-owner", help="rotate PostgreSQL's owner password")
    p.add_argument("--env-file", type=Path, default=Path(".env"), help="the stack's env file")
    p.add_argument("-f", "--file", dest="files", action="append", default=[],
                   help="compose file (repeatable; default compose/compose.yaml)")  # fmt: skip
    p.add_argument("-p", "--project", default=None, help="compose project name")
    args = parser.parse_args(argv)
    if not args.env_file.is_file():
        print(f"rotate: env file {args.env_file} not found", file=sys.stderr)
        return 2
    stack = Stack(
        env_file=args.env_file, files=args.files or ["compose/compose.yaml"], project=args.project
    )
    try:
        rotate_db_owner(stack, new_password())
    except StepFailed as exc:
        print(f"rotate: nothing changed: {exc}", file=sys.stderr)
        return 1
    except OSError:
        return 1
    print(f"rotate: {NAME} changed in the database and in {args.env_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
