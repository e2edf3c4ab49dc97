"""The gate's rules and settings, without an engine."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from scaler.gate import rules
from scaler.gate.app import Settings
from scaler.gate.rules import (
    MANAGED_LABEL,
    ONEOFF_LABEL,
    PROJECT_LABEL,
    STACK_LABEL,
    BadInput,
    Scope,
)

SCOPE = Scope(PROJECT_LABEL, "proj")


def test_managed_means_opted_in_of_the_project_and_no_one_off() -> None:
    assert SCOPE.holds({MANAGED_LABEL: "true", PROJECT_LABEL: "proj"})
    assert SCOPE.holds({MANAGED_LABEL: "true", PROJECT_LABEL: "proj", ONEOFF_LABEL: "False"})
    for labels in [
        None,
        {},
        {MANAGED_LABEL: "true"},
        {PROJECT_LABEL: "proj"},
        {MANAGED_LABEL: "false", PROJECT_LABEL: "proj"},
        {MANAGED_LABEL: "TRUE", PROJECT_LABEL: "proj"},
        {MANAGED_LABEL: "true", PROJECT_LABEL: "proj2"},
        {MANAGED_LABEL: "true", PROJECT_LABEL: "Proj"},
        {MANAGED_LABEL: "true", PROJECT_LABEL: "proj", ONEOFF_LABEL: "True"},
        {MANAGED_LABEL: "true", STACK_LABEL: "proj"},
    ]:
        assert not SCOPE.holds(labels), labels


def test_filters_are_read_strictly_and_only_narrowed() -> None:
    assert rules.parse_filters(None) == {} == rules.parse_filters("")
    assert rules.parse_filters('{"label":{"a=b":true}}') == {"label": ["a=b"]}
    narrowed = json.loads(rules.narrowed({"label": ["x=y"], "name": ["n"]}, SCOPE))
    assert narrowed == {
        "label": ["x=y", f"{MANAGED_LABEL}=true", f"{PROJECT_LABEL}=proj"],
        "name": ["n"],
    }
    for raw in [
        '{"label":["a"],"label":["b"]}',
        '{"l\u0101bel":["a"]}',
        '{"label":["\u0101"]}',
        '{"label":{"a":false}}',
        '{"label":[1]}',
        "[]",
        "{",
        "NaN",
    ]:
        with pytest.raises(BadInput):
            rules.parse_filters(raw)


def test_strict_json_refuses_duplicates_look_alikes_and_constants() -> None:
    assert rules.strict_json(b'{"a":{"b":1}}') == {"a": {"b": 1}}
    for raw in [
        b'{"a":1,"a":2}',
        b'{"x":{"a":1,"a":2}}',
        '{"Bind\u017f":1}'.encode(),
        b'{"Bind\\u017f":1}',
        b'{"a":Infinity}',
        b"\xff",
        b'{"a":1',
    ]:
        with pytest.raises(BadInput):
            rules.strict_json(raw)


def test_environment_values_are_hidden_but_the_warm_flag() -> None:
    env = ["A=1", "PASSWORD=x=y", "EMPTY=", "BARE", "WORKER_WARM_START=1", "WORKER_WARM_STARTX=1"]
    assert rules.env_names(env) == [
        "A",
        "PASSWORD",
        "EMPTY",
        "BARE",
        "WORKER_WARM_START=1",
        "WORKER_WARM_STARTX",
    ]
    inspected = {
        "Id": "x",
        "GraphDriver": {"Data": {"MergedDir": "/var/lib"}},
        "LogPath": "/l",
        "Config": {"Env": ["S=secret"], "Labels": {}},
    }
    shown = rules.sanitise_container(inspected)
    assert shown == {"Id": "x", "Config": {"Env": ["S"], "Labels": {}}}
    assert inspected["Config"]["Env"] == ["S=secret"]  # the original is untouched


def test_query_values_as_the_engine_reads_them() -> None:
    assert [rules.boolean(v) for v in ("1", "true", "True", "yes", "x")] == [True] * 5
    assert [rules.boolean(v) for v in ("", "0", "no", "false", "FALSE", "none")] == [False] * 6
    assert rules.integer("t", "10", 0, 20) == 10
    for value in ("-1", "21", "1.5", "", "\u0661\u0660", "0x1"):
        with pytest.raises(BadInput):
            rules.integer("t", value, 0, 20)


def test_settings_from_the_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-of-enough-length\n")
    settings = Settings.from_env(
        {
            "GATE_PROJECT": "celery-stack",
            "GATE_TOKEN_FILE": str(token),
            "GATE_ALLOWED_BIND_MOUNTS": "/srv/a, /srv/b,",
            "GATE_LISTEN": "[::]:2376",
            "DOCKER_HOST": "unix:///run/docker.sock",
        }
    )
    assert settings.scope == Scope(PROJECT_LABEL, "celery-stack")
    assert settings.token == "a-token-of-enough-length"
    assert settings.allowed_bind_mounts == ("/srv/a", "/srv/b")
    assert (settings.host, settings.port) == ("::", 2376)
    assert settings.docker_host == "unix:///run/docker.sock"
    stack = Settings.from_env({"GATE_STACK": "celery", "GATE_INSECURE_NO_TOKEN": "1"})
    assert stack.scope == Scope(STACK_LABEL, "celery") and stack.token is None
    assert (stack.host, stack.port) == ("0.0.0.0", 2375)
    # The token in the environment (the stack's way: compose/compose.yaml); a file wins.
    direct = {"GATE_PROJECT": "p", "GATE_TOKEN": " a-token-from-the-environment "}
    assert Settings.from_env(direct).token == "a-token-from-the-environment"
    both = {**direct, "GATE_TOKEN_FILE": str(token)}
    assert Settings.from_env(both).token == "a-token-of-enough-length"
    short = tmp_path / "short"
    short.write_text("short")
    for env, words in [
        ({}, "exactly one"),
        ({"GATE_PROJECT": "a", "GATE_STACK": "b"}, "exactly one"),
        ({"GATE_PROJECT": "a,b=c"}, "expected"),
        ({"GATE_PROJECT": "Upper"}, "expected"),
        ({"GATE_PROJECT": "a"}, "GATE_TOKEN_FILE .* or GATE_TOKEN is required"),
        ({"GATE_PROJECT": "a", "GATE_TOKEN_FILE": str(short)}, "GATE_TOKEN_FILE: .*at least 16"),
        ({"GATE_PROJECT": "a", "GATE_TOKEN": "short"}, "GATE_TOKEN: .*at least 16"),
    ]:
        with pytest.raises(ValueError, match=words):
            Settings.from_env(env)


def test_the_gate_imports_nothing_of_the_scaler_but_template_safety() -> None:
    """And the HTTP limits it shares with the scaler's API, which import nothing of the scaler."""
    package = Path(rules.__file__).parent
    for source in [*package.glob("*.py"), package.parent / "http_limits.py"]:
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("scaler"):
                    assert name.startswith("scaler.gate") or name in (
                        "scaler.backends.template_safety",
                        "scaler.http_limits",
                    ), f"{source.name} imports {name}"
                    assert source.name != "http_limits.py", f"http_limits imports {name}"


def test_json_nested_too_deeply_is_bad_input_not_a_crash() -> None:
    """A 4 KiB body (or a filters parameter) of brackets: json's RecursionError was a 500."""
    for text in ("[" * 2000 + "]" * 2000, '{"a":' * 1500 + "1" + "}" * 1500):
        with pytest.raises(BadInput, match="nested too deeply"):
            rules.strict_json(text)
        with pytest.raises(BadInput):
            rules.parse_filters(text)
