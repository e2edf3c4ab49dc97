"""Secrets given as files: ``X_FILE=/run/secrets/x`` sets ``X`` to that file's content.

The official images' convention, used by every process of the stack (services.config) and by the
scaler (its Redis URL and HTTP token), so that a Docker or Swarm secret never appears in a
container's environment (``docker inspect``). It lives in the scaler because the scaler imports
nothing of ``services`` (it runs beside any Celery project); the services import it from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

FILE_SUFFIX = "_FILE"
# A secret file is a password or a URL: anything larger is a wrong path, not a secret.
_MAX_SECRET_FILE_BYTES = 64 * 1024


class FileVariableError(ValueError):
    """One or more ``X_FILE`` variables are unusable; the message names each of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def file_variables(
    env: Mapping[str, str], names: tuple[str, ...]
) -> tuple[dict[str, str], list[str]]:
    """``env`` with each ``X_FILE`` of ``names`` read into ``X``, and the problems found."""
    resolved = dict(env)
    problems: list[str] = []
    for name in names:
        file_name = name + FILE_SUFFIX
        path = (env.get(file_name) or "").strip()
        if not path:
            continue
        if (env.get(name) or "").strip():
            # Which one would win is a guess; the official images refuse this too.
            problems.append(
                f"{name} and {file_name}={path!r} are both set: expected only one of them"
            )
            continue
        try:
            with open(path, "rb") as handle:
                raw = handle.read(_MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            problems.append(f"{file_name}={path!r}: expected a readable file ({exc.strerror})")
            continue
        if len(raw) > _MAX_SECRET_FILE_BYTES:
            problems.append(
                f"{file_name}={path!r}: expected a secret of at most {_MAX_SECRET_FILE_BYTES} bytes"
            )
            continue
        try:
            # `printf '%s\n' secret > file` and editors add a newline that is not part of it.
            value = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            problems.append(f"{file_name}={path!r}: expected UTF-8 text")
            continue
        if not value.strip():
            problems.append(f"{file_name}={path!r}: expected a non-empty secret, the file is empty")
            continue
        resolved[name] = value
    return resolved, problems


def with_file_variables(env: Mapping[str, str] | None, names: tuple[str, ...]) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with every ``X_FILE`` of ``names`` read into
    ``X``; raises FileVariableError naming each variable set twice or whose file is unusable."""
    resolved, problems = file_variables(os.environ if env is None else env, names)
    if problems:
        raise FileVariableError(problems)
    return resolved
