"""`scaler simulate` end to end, as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCALER = Path(sys.executable).parent / "scaler"
DEFAULT = ROOT / "compose/scaler-policy.yaml"
ORACLE = ROOT / "scaler/simulate/policies/oracle.yaml"
TRACE = ROOT / "scaler/simulate/traces/bench2-burst.yaml"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCALER), "simulate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_two_policies_table_and_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run("--policy", DEFAULT, "--policy", ORACLE, "--trace", TRACE, "--out", out)
    assert p.returncode == 0, p.stderr
    assert "policy scaler-policy:" in p.stdout and "policy oracle:" in p.stdout
    assert "worker-io" in p.stdout and "REPLICA-s" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    pols = summary["policies"]
    assert set(pols) == {"scaler-policy", "oracle"}
    assert pols["scaler-policy"]["horizon_s"] == pols["oracle"]["horizon_s"]  # one horizon
    io = pols["scaler-policy"]["services"]["worker-io"]
    for key in (
        "drain_s",
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
        "completion_p95_s",
        "replica_seconds",
        "scale_actions",
        "reversals",
        "peak_replicas",
        "tasks",
    ):
        assert key in io, key
    assert io["tasks"] == 900 and io["peak_replicas"] == 6 and io["scale_actions"] >= 2
    oracle = pols["oracle"]["services"]["worker-io"]
    assert oracle["scale_actions"] == 0 and oracle["drain_s"] < io["drain_s"]
    assert io["replica_seconds"] < oracle["replica_seconds"]
    assert "total" in pols["oracle"]
    with (out / "steps.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "t",
        "policy",
        "service",
        "replicas",
        "waiting",
        "in_flight",
        "oldest_age",
        "warm",
    ]
    assert {r["policy"] for r in rows} == {"scaler-policy", "oracle"}
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_json_is_the_summary(tmp_path: Path) -> None:
    p = run("--policy", DEFAULT, "--policy", DEFAULT, "--trace", TRACE, "--json", "--seed", "3")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    labels = list(data["policies"])
    assert len(labels) == 2 and labels[0] != labels[1]  # duplicates disambiguated
    assert data["policies"][labels[0]]["seed"] == 3
    a, b = (data["policies"][x] for x in labels)
    assert a["services"] == b["services"]  # same policy, same seed: same figures


def test_csv_trace_and_horizon(tmp_path: Path) -> None:
    trace = tmp_path / "rec.csv"
    trace.write_text("# recorded\nt,queue,count\n3,io_intensive,50\n0,default,5\n")
    p = run("--policy", DEFAULT, "--trace", trace, "--horizon", "30", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["policies"]["scaler-policy"]
    assert s["horizon_s"] == 30 and s["services"]["worker-io"]["tasks"] == 50


def test_bad_files_exit_2_with_the_message(tmp_path: Path) -> None:
    bad_policy = tmp_path / "bad.yaml"
    bad_policy.write_text(
        "services:\n  worker-io:\n    queues: [io_intensive]\n    max_replicas: 0\n"
    )
    p = run("--policy", bad_policy, "--trace", TRACE)
    assert p.returncode == 2
    assert f"{bad_policy}: services.worker-io.max_replicas: 0 is invalid" in p.stderr

    bad_trace = tmp_path / "t.yaml"
    bad_trace.write_text("load:\n  - {kind: burst, queue: io_intensive, at: 1, count: -3}\n")
    p = run("--policy", DEFAULT, "--trace", bad_trace)
    assert p.returncode == 2
    assert f"{bad_trace}: load.0.burst.count: -3 is invalid: must be >= 1" in p.stderr

    stray = tmp_path / "s.yaml"
    stray.write_text("load:\n  - {kind: burst, queue: nowhere, at: 1, count: 3}\n")
    p = run("--policy", DEFAULT, "--trace", stray)
    assert p.returncode == 2 and "'nowhere' is not consumed" in p.stderr

    model = tmp_path / "m.yaml"
    model.write_text("services: {worker-io: {concurrency: zero}}\n")
    p = run("--policy", DEFAULT, "--trace", TRACE, "--model", model)
    assert p.returncode == 2
    assert f"{model}: services.worker-io.concurrency: 'zero' is invalid" in p.stderr

    p = run("--policy", tmp_path / "missing.yaml", "--trace", TRACE)
    assert p.returncode == 2 and "cannot read the policy file" in p.stderr
