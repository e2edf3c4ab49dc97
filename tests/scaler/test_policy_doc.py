"""docs/scaler-policy.md cannot drift from the code: the defaults of its field tables are the
policy model's, and the decision steps it lists are the functions of scaler/decide.py, each named
step a function there and each step function the core runs named in the list."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

from scaler import decide
from scaler.policy import parse_policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaler-policy.md"
FIELD_ROW = re.compile(r"^\| `(?P<field>[a-z_.]+)` \| (?P<default>[^|]+?) \|")
# Defaults the table words instead of giving a value.
WORDED = {"required", "none"}


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"### {title}")
    end = text.find("\n#", start + 1)
    return text[start : end if end > 0 else len(text)]


def value_at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def documented(default: str) -> Any:
    text = default.strip().strip("`")
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def test_the_field_tables_give_the_models_defaults() -> None:
    policy = parse_policy({"services": {"svc": {"queues": ["q"]}}}, env={})
    service = policy.services["svc"]
    problems, checked = [], 0
    for title, model in (("Top level", policy), ("Per service", service)):
        for line in section(title).splitlines():
            row = FIELD_ROW.match(line)
            if not row or row["default"].strip() in WORDED:
                continue
            field, default = row["field"], documented(row["default"])
            if field in ("defaults", "services") or default == "max_replicas":
                continue  # containers of other fields; a default that names another field
            actual = value_at(model, field)
            if hasattr(actual, "value"):  # an enum
                actual = actual.value
            if isinstance(actual, tuple):
                actual = list(actual)
            if actual != default:
                problems.append(f"{title}: {field}: the doc says {default!r}, the model {actual!r}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 25, checked


def test_the_listed_steps_are_the_functions_the_core_runs() -> None:
    text = DOC.read_text()
    listed = set(re.findall(r"^\d+\. \*\*[^*]+\*\* \(([^)]*)\)", text, re.M))
    named = {name for group in listed for name in re.findall(r"`([a-z_]+)`", group)}
    assert len(named) >= 10, named
    missing = sorted(n for n in named if not inspect.isfunction(getattr(decide, n, None)))
    assert not missing, f"docs/scaler-policy.md names steps decide.py does not have: {missing}"
    # Every public function of the core that decides (takes the policy or a service policy) and
    # that the core calls is a step the doc names, so a new step cannot go undocumented.
    source = inspect.getsource(decide)
    public = {
        name
        for name, fn in inspect.getmembers(decide, inspect.isfunction)
        if fn.__module__ == decide.__name__
        and not name.startswith("_")
        and {"sp", "policy"} & set(inspect.signature(fn).parameters)
        and len(re.findall(rf"\b{name}\(", source)) > 1  # called, not only defined
    }
    undocumented = sorted(public - named - {"decide"})  # the entry point, not a step
    assert not undocumented, f"steps the doc does not list: {undocumented}"
