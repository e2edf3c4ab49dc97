"""scaler simulate's traces and models: every generator, the CSV format, and bad input in words."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler.policy import parse_policy
from scaler.simulate.model import ModelError, build_model, load_model_spec, parse_model_spec
from scaler.simulate.trace import TraceError, load_trace, parse_csv, parse_trace_data

POLICY = parse_policy(
    {"services": {"worker-io": {"queues": ["io_intensive"]}, "worker-x": {"queues": ["x"]}}},
    env={},
)


def total(arrivals: dict[str, list[tuple[float, int]]], queue: str) -> int:
    return sum(n for _, n in arrivals.get(queue, []))


def test_csv_with_comments_unsorted_rows_and_zero_counts(tmp_path: Path) -> None:
    f = tmp_path / "rec.csv"
    f.write_text(
        "# scaler flight recorder: started ..., epoch 1714564800.0, resolution 1\n"
        "t,queue,count\n5,io_intensive,2\n\n1.5,io_intensive,3\n# note\n5,io_intensive,1\n"
        "2,x,0\n"
    )
    trace = load_trace(f)
    assert trace.arrivals() == {"io_intensive": [(1.5, 3), (5.0, 3)]}
    assert trace.duration_s == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t,queue,count\nabc,q,1\n", "rec.csv:2: t: 'abc' is invalid"),
        ("t,queue,count\n-1,q,1\n", "rec.csv:2: t: '-1' is invalid"),
        ("t,queue,count\n1,q,-2\n", "rec.csv:2: count: '-2' is invalid: expected an integer >= 0"),
        ("t,queue,count\n1,q,1.5\n", "rec.csv:2: count: '1.5' is invalid"),
        ("t,queue,count\n1,,1\n", "rec.csv:2: queue: '' is invalid"),
        ("t,queue,count\n1,q\n", "rec.csv:2: '1,q' is invalid: expected 3 fields"),
        ("time,q,n\n1,q,1\n", "rec.csv:1: header 'time,q,n' is invalid"),
        ("# only a comment\n", "no header"),
        ("t,queue,count\n1,q,0\n", "no tasks"),
        ("t,queue,count\n1,q,1\nt,queue,count\n", "rec.csv:3: a second header"),
    ],
)
def test_csv_errors_name_line_field_and_value(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "rec.csv"
    f.write_text(text)
    with pytest.raises(TraceError) as info:
        load_trace(f)
    assert any(expected in line for line in info.value.problems), info.value.problems
    assert all(line.startswith(str(f)) for line in info.value.problems)


def test_csv_reports_every_bad_line_at_once() -> None:
    with pytest.raises(TraceError) as info:
        parse_csv("t,queue,count\nx,q,1\n1,q,y\n", "r.csv")
    assert len(info.value.problems) == 2


def test_burst_at_once_and_spread() -> None:
    t = parse_trace_data(
        {
            "load": [
                {"kind": "burst", "queue": "x", "at": 10, "count": 5},
                {"kind": "burst", "queue": "io_intensive", "at": 0, "count": 4, "spread_s": 2},
            ]
        },
        "b.yaml",
    )
    a = t.arrivals()
    assert a["x"] == [(10.0, 5)]
    assert a["io_intensive"] == [(0.0, 1), (0.5, 1), (1.0, 1), (1.5, 1)]
    assert t.duration_s >= 10


def test_constant_even_is_exact_and_poisson_is_seeded() -> None:
    data = {
        "duration_s": 100,
        "load": [
            {"kind": "constant", "queue": "x", "rate": 2, "start": 10, "end": 20},
            {"kind": "poisson", "queue": "io_intensive", "rate": 5},
        ],
    }
    t = parse_trace_data(data, "c.yaml")
    a = t.arrivals(1)
    assert total(a, "x") == 20 and a["x"][0][0] == 10 and a["x"][-1][0] < 20
    n = total(a, "io_intensive")
    assert 400 < n < 600  # 5/s over 100 s, Poisson
    assert parse_trace_data(data, "c.yaml").arrivals(1) == a
    assert parse_trace_data(data, "c.yaml").arrivals(2)["io_intensive"] != a["io_intensive"]


@settings(max_examples=20, deadline=None)
@given(
    base=st.floats(0, 2),
    extra=st.floats(0.1, 3),
    phase=st.floats(0, 1000),
    poisson=st.booleans(),
)
def test_diurnal_total_follows_the_mean_rate(
    base: float, extra: float, phase: float, poisson: bool
) -> None:
    peak = base + extra
    period = 1000.0
    t = parse_trace_data(
        {
            "duration_s": 4000,
            "load": [
                {
                    "kind": "diurnal",
                    "queue": "x",
                    "base": base,
                    "peak": peak,
                    "period_s": period,
                    "phase_s": phase,
                    "arrivals": "poisson" if poisson else "even",
                }
            ],
        },
        "d.yaml",
    )
    expected = (base + peak) / 2 * 4000
    n = total(t.arrivals(3), "x")
    slack = 6 * expected**0.5 + 3 if poisson else 2
    assert abs(n - expected) <= slack
    times = [x for x, _ in t.arrivals(3)["x"]]
    assert times == sorted(times) and all(0 <= x < 4000 for x in times)


def test_diurnal_peaks_half_a_period_after_phase() -> None:
    t = parse_trace_data(
        {
            "duration_s": 1000,
            "load": [
                {
                    "kind": "diurnal",
                    "queue": "x",
                    "base": 0,
                    "peak": 10,
                    "period_s": 1000,
                    "phase_s": 0,
                }
            ],
        },
        "d.yaml",
    )
    a = t.arrivals()["x"]
    early = sum(n for x, n in a if x < 100)
    middle = sum(n for x, n in a if 450 <= x < 550)
    assert middle > 5 * early


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"load": [{"kind": "burst", "queue": "x", "at": -1, "count": 3}]},
            "load.0.burst.at: -1 is invalid: must be >= 0",
        ),
        (
            {"load": [{"kind": "burst", "queue": "x", "at": 1, "count": 0}]},
            "load.0.burst.count: 0 is invalid: must be >= 1",
        ),
        (
            {"load": [{"kind": "constant", "queue": "x", "rate": 0, "end": 5}]},
            "load.0.constant.rate: 0 is invalid: must be > 0",
        ),
        (
            {"load": [{"kind": "constant", "queue": "x", "rate": 1, "end": 5, "sped": 1}]},
            "load.0.constant.sped: unknown field",
        ),
        ({"load": [{"kind": "wave", "queue": "x"}]}, "load.0: "),
        (
            {"load": [{"kind": "poisson", "queue": "x", "rate": 1}]},
            "duration_s: required field is missing: load.0 (poisson) has no end",
        ),
        (
            {"load": [{"kind": "diurnal", "queue": "x", "base": 3, "peak": 1}], "duration_s": 9},
            "peak 1 must be >= base 3",
        ),
        (
            {"duration_s": 5, "load": [{"kind": "burst", "queue": "x", "at": 10, "count": 1}]},
            "load.0.at: 10 is invalid: must be < duration_s (5)",
        ),
        (
            {"duration_s": -5, "load": [{"kind": "burst", "queue": "x", "at": 0, "count": 1}]},
            "duration_s: -5 is invalid: must be > 0",
        ),
        ({"load": []}, "load: [] is invalid: must not be empty"),
        (
            {
                "load": [{"kind": "burst", "queue": "x", "at": 0, "count": 1}],
                "model": {"services": {"worker-io": {"concurrency": 0}}},
            },
            "model: services.worker-io.concurrency: 0 is invalid: must be >= 1",
        ),
        ([1, 2], "list is invalid: expected a mapping"),
    ],
)
def test_yaml_errors_name_field_and_value(data: object, expected: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_trace_data(data, "t.yaml")
    assert any(expected in line for line in info.value.problems), info.value.problems
    assert all(line.startswith("t.yaml") for line in info.value.problems)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read the trace file"):
        load_trace(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("load: [\n")
    with pytest.raises(TraceError, match=r"bad.yaml: not valid YAML at line"):
        load_trace(bad)


def test_a_queue_no_service_consumes_is_named_with_the_services_queues() -> None:
    t = parse_trace_data({"load": [{"kind": "burst", "queue": "nope", "at": 0, "count": 1}]}, "t")
    with pytest.raises(TraceError) as info:
        t.check_queues(POLICY)
    line = info.value.problems[0]
    assert "'nope'" in line and "worker-io: ['io_intensive']" in line and "worker-x: ['x']" in line


def test_model_layers_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("services:\n  worker-io: {startup_s: 2.5}\nhost: {host_cpu: [[10, 99], [0, 5]]}\n")
    trace_layer = parse_model_spec({"services": {"worker-io": {"concurrency": 4}}}, "t: model")
    model = build_model(POLICY, trace_layer, load_model_spec(f))
    io = model.services["worker-io"]
    assert io.concurrency == 4 and io.startup_s.upper() == 2.5  # both layers apply
    assert model.queues["io_intensive"].duration_s.uniform == (1.0, 2.0)  # bench 2's tasks
    assert model.services["worker-x"].concurrency == 1  # generic default
    assert model.host.host_cpu == ((0.0, 5.0), (10.0, 99.0))  # sorted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("services: {worker-io: {concurrency: 0}}", "services.worker-io.concurrency: 0"),
        ("services: {worker-io: {startup_s: {gamma: 1}}}", "expected one of {fixed: x}"),
        ("services: {worker-io: {startup_s: {uniform: [3, 1]}}}", "low <= high"),
        ("services: {worker-io: {drain_s: {lognormal: {median: -1, sigma: 1}}}}", "median"),
        ("queues: {x: {cpu_percent_per_task: 200}}", "200 is invalid: must be <= 100"),
        ("host: {cpu_cores: 0}", "host.cpu_cores: 0 is invalid: must be > 0"),
        ("hosts: {}", "hosts: unknown field"),
        ("services: {worker-io: {concurency: 2}}", "concurency: unknown field"),
        ("[1]", "expected a mapping"),
    ],
)
def test_model_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(text)
    with pytest.raises(ModelError) as info:
        load_model_spec(f)
    assert any(expected in line for line in info.value.problems), info.value.problems
    assert all(line.startswith(str(f)) for line in info.value.problems)


def test_shipped_traces_load_and_match_the_stack_policy() -> None:
    from scaler.policy import load_policy

    root = Path(__file__).resolve().parents[2]
    policy = load_policy(root / "compose/scaler-policy.yaml", env={})
    names = {p.name for p in (root / "scaler/simulate/traces").glob("*.yaml")}
    assert {
        "burst.yaml",
        "bursts-idle.yaml",
        "diurnal.yaml",
        "trickle.yaml",
        "bench2-burst.yaml",
    } <= names
    for name in names:
        trace = load_trace(root / "scaler/simulate/traces" / name)
        trace.check_queues(policy)
        build_model(policy, trace.model)
    bench2 = load_trace(root / "scaler/simulate/traces/bench2-burst.yaml")
    assert total(bench2.arrivals(), "io_intensive") == 900
