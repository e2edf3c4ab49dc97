"""Input that cannot be used, reported as every problem at once, one line each.

The policy, the simulator's model and its traces are all files a person writes; each mistake is
reported as a line naming the path, the value and what was expected, all lines together, because
someone fixing a file wants every mistake at once, not one per attempt. pydantic does the
validating; ``validation_lines`` words its errors that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

__all__ = [
    "Problems",
    "WordedProblems",
    "expectation",
    "parse_yaml",
    "read_text_file",
    "validation_lines",
]


class Problems(ValueError):
    """Unusable input. ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


class WordedProblems(ValueError):
    """Raised inside a model validator with fully worded lines: only their location is added."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


_WORDS = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "too_short": "must not be empty",
    "missing": "required field is missing",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "int_type": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
}


def expectation(err: Mapping[str, Any]) -> str:
    """Pydantic's message for one error, reworded as what was expected."""
    words = _WORDS.get(str(err.get("type", "")))
    if words is not None:
        return words.format(**{k: v for k, v in (err.get("ctx") or {}).items()})
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def validation_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    """Pydantic's errors as 'path: value is invalid: expectation' lines, ``prefix`` first."""
    lines: list[str] = []
    for err in exc.errors():
        parts = [*(prefix.split(".") if prefix else []), *(str(p) for p in err["loc"])]
        loc = ".".join(p for p in parts if p)
        kind = err.get("type")
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, WordedProblems):
            lines.extend(f"{loc}.{line}" if loc else line for line in inner.lines)
        elif kind == "extra_forbidden":
            lines.append(f"{loc}: unknown field")
        elif kind == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            lines.append(f"{loc}: {err.get('input')!r} is invalid: {expectation(err)}")
    return lines


def read_text_file(path: Path, what: str, error: type[Problems]) -> str:
    """The file's text; ``error`` naming the file and ``what`` it is when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error([f"{path}: cannot read the {what}: {exc.strerror or exc}"]) from None


def parse_yaml(text: str, path: Path, error: type[Problems]) -> Any:
    """YAML as plain data; ``error`` naming the file, line and column when it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error([f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}"]) from None
