"""docs/celery-settings.md cannot drift from the code: every row that names Celery settings is
read and its value checked against the app the code builds (``create_app``, code defaults) and,
where a row says what the stack sets, against compose.yaml's defaults. Rows that name no
setting of ``app.conf`` (a worker flag, a header, the base task's retry) are listed in UNCHECKED
with where they are checked instead, so a new row is either checked or listed."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from services.application import create_app
from services.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "celery-settings.md"
COMPOSE = ROOT / "compose" / "compose.yaml"
ROW = re.compile(r"^\| (?P<names>`[^|]*?) \| (?P<value>[^|]*?) \|")
# Rows without a plain value of app.conf, and where they are checked.
UNCHECKED = {
    "autoretry_for": "the base task's retry: tests/services/test_svc_delivery.py",
    "task_queues": "routing: tests/services/test_svc_routing.py",
    "task_routes": "routing: tests/services/test_svc_routing.py",
    "broker_transport_options": "priorities: tests/services/test_svc_priority.py",
    "enqueued_at": "a header, not a setting: tests/services/test_svc_routing.py",
    "--without-mingle": "a worker flag: services/worker.py",
    "--without-gossip": "a worker flag: services/worker.py",
    "worker_soft_shutdown_timeout": "a setting with a derived twin: test_svc_config.py",
}


def conf_value(conf: Any, name: str) -> Any:
    """``a.b`` -> conf['a']['b']."""
    head, *rest = name.split(".")
    value = conf[head]
    for part in rest:
        value = value[part]
    return value


def literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def stack_default(variable: str) -> int:
    """The value compose.yaml gives ``variable`` when .env does not (``${X:-N}``)."""
    match = re.search(rf"\${{{variable}:-(\d+)}}", COMPOSE.read_text())
    assert match, f"compose.yaml sets no default for {variable}"
    return int(match.group(1))


def test_every_settings_row_of_the_doc_matches_the_code_and_the_stack() -> None:
    conf = create_app(load_settings({})).conf
    checked: list[str] = []
    problems: list[str] = []
    for line in DOC.read_text().splitlines():
        row = ROW.match(line)
        if not row:
            continue
        names = re.findall(r"`([^`]+)`", row["names"])
        value = row["value"].strip()
        if names[0] in UNCHECKED:
            continue
        plain = re.fullmatch(r"`([^`]+)`", value)
        paired = re.fullmatch(r"`[^`]+`(, `[^`]+`)+( \([^)]*\))?", value)
        defaults = re.findall(r"`(CELERY_[A-Z_]+)`[^`/;]*?\(?(\d+)", value)
        if plain:
            wanted = [(n, literal(plain[1])) for n in names]
        elif paired and len(re.findall(r"`([^`]+)`", value)) == len(names):
            values = re.findall(r"`([^`]+)`", value)
            wanted = [(n, literal(v)) for n, v in zip(names, values, strict=True)]
        elif value == "on":
            wanted = [
                (n.split("=")[0], literal(n.split("=")[1]) if "=" in n else True) for n in names
            ]
        elif defaults and len(defaults) == len(names):
            wanted = [(n, int(d)) for n, (_, d) in zip(names, defaults, strict=True)]
            stack = re.search(r"the stack sets ([\d /]+?) ?s?\)", value)
            if stack:
                for (variable, _), number in zip(defaults, stack[1].split("/"), strict=True):
                    if (default := stack_default(variable)) != int(number):
                        problems.append(f"{variable}: compose.yaml {default}, the doc {number}")
        else:
            problems.append(
                f"a row the test cannot read (add it to UNCHECKED, or simplify): {line}"
            )
            continue
        for name, expected in wanted:
            try:
                actual = conf_value(conf, name)
            except KeyError:
                problems.append(f"{name}: not a setting of app.conf (doc: {expected!r})")
                continue
            if hasattr(actual, "total_seconds"):
                actual = int(actual.total_seconds())
            if actual != expected and not (isinstance(actual, list | tuple) and
                                           list(actual) == expected):  # fmt: skip
                problems.append(f"{name}: the doc says {expected!r}, the code sets {actual!r}")
            checked.append(name)
    assert not problems, "\n".join(problems)
    assert len(checked) >= 20, f"only {len(checked)} settings checked: {checked}"
