"""The policy file: the example validates, defaults merge, env defaults work, errors name the path.

No services needed: these are pure parsing tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scaler.policy import (
    Policy,
    PolicyError,
    ScaleRule,
    load_policy,
    parse_policy,
    validate_file,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scaler" / "policy.example.yaml"
NO_ENV: dict[str, str] = {}


def _one(**service: Any) -> dict[str, Any]:
    return {"services": {"worker-io": {"queues": ["io_intensive"], **service}}}


def _problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(data, env if env is not None else NO_ENV)
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


def test_example_file_validates_with_the_five_services() -> None:
    policy = load_policy(EXAMPLE, env=NO_ENV)
    assert set(policy.services) == {
        "worker-default",
        "worker-cpu",
        "worker-io",
        "worker-priority",
        "worker-scheduled",
    }
    queues = {q for svc in policy.services.values() for q in svc.queues}
    assert queues == {"default", "cpu_intensive", "io_intensive", "priority", "scheduled"}
    assert validate_file(EXAMPLE, env=NO_ENV) == []
    # Defaults are merged under each service; a service's own field wins.
    assert policy.services["worker-default"].max_replicas == 6
    assert policy.services["worker-io"].max_replicas == 8
    assert policy.services["worker-scheduled"].min_replicas == 0
    assert policy.services["worker-priority"].scale_down.stabilization_s == 180
    assert policy.services["worker-default"].scale_down.stabilization_s == 60


def test_built_in_defaults_when_the_file_says_little() -> None:
    policy = parse_policy(_one(), NO_ENV)
    svc = policy.services["worker-io"]
    assert policy.interval_s == 2.0
    assert (svc.min_replicas, svc.max_replicas) == (1, 10)
    assert svc.target.tasks_per_replica == 10 and svc.target.tolerance == 0.1
    assert svc.scale_up.stabilization_s == 0 and svc.scale_down.stabilization_s == 120
    assert svc.emergency is None


def test_a_rule_can_override_one_field_and_keep_the_other_defaults() -> None:
    svc = parse_policy(_one(scale_down={"max_step": 2}), NO_ENV).services["worker-io"]
    assert svc.scale_down.max_step == 2
    assert svc.scale_down.stabilization_s == 120  # the built-in, not a missing-field error
    assert svc.scale_down.cooldown_s == 30


def test_defaults_section_is_merged_deeply_and_services_win() -> None:
    data = {
        "defaults": {"max_replicas": 3, "target": {"latency_s": 9}},
        "services": {
            "a": {"queues": ["qa"]},
            "b": {"queues": ["qb"], "max_replicas": 5, "target": {"tasks_per_replica": 2}},
        },
    }
    policy = parse_policy(data, NO_ENV)
    assert policy.services["a"].max_replicas == 3
    assert policy.services["b"].max_replicas == 5
    assert policy.services["b"].target.tasks_per_replica == 2
    assert policy.services["b"].target.latency_s == 9  # from defaults, not lost by the merge


def test_env_defaults_apply_and_explicit_fields_win() -> None:
    env = {
        "MIN_WORKERS": "2",
        "MAX_WORKERS": "7",
        "CPU_THRESHOLD": "70",
        "MEMORY_THRESHOLD": "75.5",
        "QUEUE_THRESHOLD": "50",
    }
    data = {
        "services": {
            "a": {"queues": ["qa"]},
            "b": {"queues": ["qb"], "max_replicas": 3, "target": {"tasks_per_replica": 4}},
        }
    }
    policy = parse_policy(data, env)
    a, b = policy.services["a"], policy.services["b"]
    assert (a.min_replicas, a.max_replicas) == (2, 7)
    assert a.target.tasks_per_replica == 50
    assert a.resources.cpu_percent == 70 and a.resources.memory_percent == 75.5
    assert policy.host.cpu_percent == 70 and policy.host.memory_percent == 75.5
    assert b.max_replicas == 3 and b.target.tasks_per_replica == 4
    explicit_host = parse_policy({**data, "host": {"cpu_percent": 95}}, env).host
    assert explicit_host.cpu_percent == 95 and explicit_host.memory_percent == 75.5


def test_env_defaults_are_read_from_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_WORKERS", "4")
    assert parse_policy(_one()).services["worker-io"].max_replicas == 4


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MIN_WORKERS", "-1", "MIN_WORKERS: '-1' is invalid: expected an integer >= 0"),
        ("MIN_WORKERS", "two", "MIN_WORKERS: 'two' is invalid: expected an integer >= 0"),
        ("MAX_WORKERS", "0", "MAX_WORKERS: '0' is invalid: expected an integer >= 1"),
        ("MAX_WORKERS", "10", None),
        ("CPU_THRESHOLD", "120", "CPU_THRESHOLD: '120' is invalid: expected a percentage"),
        ("MEMORY_THRESHOLD", "x", "MEMORY_THRESHOLD: 'x' is invalid: expected a percentage"),
        ("QUEUE_THRESHOLD", "0", "QUEUE_THRESHOLD: '0' is invalid: expected a number > 0"),
        ("QUEUE_THRESHOLD", "nan", "QUEUE_THRESHOLD: 'nan' is invalid: expected a number > 0"),
    ],
)
def test_bad_env_values_name_the_variable(name: str, value: str, expected: str | None) -> None:
    if expected is None:
        parse_policy(_one(), {name: value})
        return
    problems = _problems(_one(), {name: value})
    assert any(p.startswith(expected) for p in problems), problems


def test_env_min_above_max_is_refused() -> None:
    problems = _problems(_one(), {"MIN_WORKERS": "5", "MAX_WORKERS": "2"})
    assert problems == ["MAX_WORKERS: '2' is invalid: must be >= MIN_WORKERS (5)"]


def test_max_below_min_names_path_value_and_expectation() -> None:
    problems = _problems(_one(min_replicas=1, max_replicas=0))
    assert "services.worker-io.max_replicas: 0 is invalid: must be >= 1" in problems
    problems = _problems(_one(min_replicas=3, max_replicas=2))
    assert problems == [
        "services.worker-io.max_replicas: 2 is invalid: must be >= min_replicas (3)"
    ]


def test_unknown_fields_are_refused_at_every_level() -> None:
    data = _one(targt={"tasks_per_replica": 3}, scale_up={"cooldown": 4})
    data["bogus"] = True
    data["host"] = {"cpu": 3}
    problems = _problems(data)
    assert "services.worker-io.targt: unknown field" in problems
    assert "services.worker-io.scale_up.cooldown: unknown field" in problems
    assert "bogus: unknown field" in problems
    assert "host.cpu: unknown field" in problems


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ({"queues": []}, "services.worker-io.queues: [] is invalid: must not be empty"),
        (
            {"queues": ["a", "a"]},
            "services.worker-io.queues: ['a', 'a'] is invalid: names must be unique",
        ),
        (
            {"queues": ["io_intensive"], "min_replicas": -1},
            "services.worker-io.min_replicas: -1 is invalid: must be >= 0",
        ),
        (
            {"queues": ["io_intensive"], "max_replicas": "many"},
            "services.worker-io.max_replicas: 'many' is invalid:",
        ),
        (
            {"queues": ["io_intensive"], "target": {"tolerance": 1.5}},
            "services.worker-io.target.tolerance: 1.5 is invalid: must be < 1",
        ),
        (
            {"queues": ["io_intensive"], "target": {"tasks_per_replica": None}},
            "services.worker-io.target: {'tasks_per_replica': None} is invalid: "
            "expected tasks_per_replica and/or latency_s to be set",
        ),
        (
            {"queues": ["io_intensive"], "scale_up": {"max_step": 0}},
            "services.worker-io.scale_up.max_step: 0 is invalid: must be >= 1",
        ),
        (
            {"queues": ["io_intensive"], "emergency": {"queue": "io_intensive"}},
            "services.worker-io.emergency: {'queue': 'io_intensive'} is invalid: "
            "expected depth and/or latency_s to be set",
        ),
        (
            {"queues": ["io_intensive"], "emergency": {"queue": "other", "depth": 5}},
            "services.worker-io.emergency.queue: 'other' is invalid: "
            "must be one of this service's queues ['io_intensive']",
        ),
        (
            {
                "queues": ["io_intensive"],
                "max_replicas": 4,
                "emergency": {"queue": "io_intensive", "depth": 5, "scale_to": 9},
            },
            "services.worker-io.emergency.scale_to: 9 is invalid: must be within "
            "[min_replicas, max_replicas] = [1, 4]",
        ),
        (
            {"queues": ["io_intensive"], "resources": {"cpu_percent": 0}},
            "services.worker-io.resources.cpu_percent: 0 is invalid: must be > 0",
        ),
        (
            {"queues": ["io_intensive"], "scale_down": {"select": "avg"}},
            "services.worker-io.scale_down.select: 'avg' is invalid:",
        ),
        ({}, "services.worker-io.queues: required field is missing"),
    ],
)
def test_each_error_names_path_value_and_expectation(
    service: dict[str, Any], expected: str
) -> None:
    problems = _problems({"services": {"worker-io": service}})
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "interval_s": 0,
        "services": {
            "a": {"queues": ["q"], "min_replicas": 5, "max_replicas": 1},
            "b": {"queues": ["r"], "targt": 1},
        },
    }
    problems = _problems(data, {"MAX_WORKERS": "no"})
    assert len(problems) == 4, problems
    assert {p.split(":")[0] for p in problems} == {
        "MAX_WORKERS",
        "interval_s",
        "services.a.max_replicas",
        "services.b.targt",
    }


def test_a_queue_belongs_to_one_service_only() -> None:
    data = {"services": {"a": {"queues": ["shared"]}, "b": {"queues": ["x", "shared"]}}}
    assert _problems(data) == [
        "services.b.queues.1: 'shared' is invalid: already consumed by a; "
        "a queue may belong to one service only"
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1, 2], "(top level): list is invalid: expected a mapping"),
        ({}, "services: None is invalid: expected a non-empty mapping"),
        ({"services": {}}, "services: {} is invalid: expected a non-empty mapping"),
        ({"services": {"a": 3}}, "services.a: 3 is invalid: expected a mapping of fields"),
        (
            {"defaults": [1], "services": {"a": {"queues": ["q"]}}},
            "defaults: [1] is invalid: expected a mapping",
        ),
        (
            {"stale_after_s": 1, "interval_s": 2, "services": {"a": {"queues": ["q"]}}},
            "stale_after_s: 1.0 is invalid: must be >= interval_s (2.0)",
        ),
        (
            {"wakeup": {"debounce_s": 0}, "services": {"a": {"queues": ["q"]}}},
            "wakeup.debounce_s: 0 is invalid: must be > 0",
        ),
        (
            {"wakeup": {"events": "sometimes"}, "services": {"a": {"queues": ["q"]}}},
            "wakeup.events: 'sometimes' is invalid:",
        ),
    ],
)
def test_structural_errors(data: object, expected: str) -> None:
    problems = _problems(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_files_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert validate_file(missing, NO_ENV)[0].startswith(f"{missing}: cannot read the policy file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  a: [unclosed\n", encoding="utf-8")
    (line,) = validate_file(bad, NO_ENV)
    assert line.startswith(f"{bad}: not valid YAML at line ")
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  worker-x:\n    queues: [x]\n", encoding="utf-8")
    assert validate_file(good, NO_ENV) == []
    assert isinstance(load_policy(good, NO_ENV), Policy)


def test_models_are_frozen() -> None:
    policy = parse_policy(_one(), NO_ENV)
    with pytest.raises(ValueError):
        policy.services["worker-io"].min_replicas = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("rule", "current", "expected"),
    [
        ({"max_step": 4}, 10, 4),
        ({"max_step_percent": 50}, 10, 5),
        ({"max_step_percent": 50}, 1, 1),  # never below one replica
        ({"max_step_percent": 50}, 0, 1),
        ({"max_step": 4, "max_step_percent": 100}, 10, 10),  # "max": the larger wins
        ({"max_step": 4, "max_step_percent": 100}, 2, 4),
        ({"max_step": 4, "max_step_percent": 100, "select": "min"}, 10, 4),
        ({"max_step": 4, "max_step_percent": 10, "select": "min"}, 10, 1),
        ({}, 10, None),
    ],
)
def test_step_limit(rule: dict[str, Any], current: int, expected: int | None) -> None:
    step = ScaleRule(stabilization_s=0, cooldown_s=0, **rule).step_limit(current)
    assert step == expected


def test_a_warm_pool_must_fit_beside_the_minimum_within_max() -> None:
    assert _problems(_one(min_replicas=2, max_replicas=3, warm=2)) == [
        "services.worker-io.warm: 2 is invalid: min_replicas + warm (2 + 2) must be <= "
        "max_replicas (3); warm replicas count against the maximum"
    ]
    assert any("warm" in p for p in _problems(_one(warm=-1)))
    ok = parse_policy({**_one(warm=1, warm_at_zero=False), "wakeup": {"events": False}}, NO_ENV)
    sp = ok.services["worker-io"]
    assert (sp.warm, sp.warm_at_zero, ok.wakeup.events) == (1, False, False)
