"""The Prometheus alert rules and the Grafana dashboard in compose/monitoring/.

`promtool check rules` validates the rules, `promtool test rules` runs their unit tests (input
series -> expected alerts, scaler-alerts.test.yml), `promtool check config` the scrape config;
every metric the rules and the dashboard name is one the scaler exports, and every dashboard query
parses (checked by promtool as recording rules). promtool is Debian's `prometheus` package
(.ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scaler.metrics import ScalerMetrics

MONITORING = Path(__file__).resolve().parents[2] / "compose" / "monitoring"
RULES = MONITORING / "scaler-alerts.yml"
DASHBOARD = MONITORING / "grafana-scaler-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; .ci/run does)"
)
METRIC = re.compile(r"\b(scaler_[a-z_]+)\b")


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    proc = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=MONITORING
    )
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def exported_names() -> set[str]:
    """Every sample name the scaler's registry can expose (counters with _total, etc.)."""
    names = set()
    for family in ScalerMetrics().registry.collect():
        names.add(family.name)
        names.update(
            f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum", "_info")
        )
    return names


def dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    queries += [a["expr"] for a in data["annotations"]["list"]]
    return queries


@needs_promtool
def test_the_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", RULES.name)
    assert "SUCCESS" in promtool("test", "rules", "scaler-alerts.test.yml")
    assert "valid prometheus config" in promtool("check", "config", "prometheus.yml")


def test_every_alert_covers_the_issue_and_names_only_exported_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert {
        "ScalerDown",
        "ScalerNotLeadingAnywhere",
        "ScalerServiceAtMaxBacklogGrowing",
        "ScalerOldestMessagePastObjective",
        "ScalerScaleFailing",
    } <= set(rules)
    exported = exported_names()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        unknown = set(METRIC.findall(rule["expr"])) - exported
        assert not unknown, f"{name} names metrics the scaler does not export: {unknown}"
    tested = set(
        re.findall(r"alertname: (\w+)", (MONITORING / "scaler-alerts.test.yml").read_text())
    )
    assert set(rules) <= tested, f"alerts without a promtool test: {set(rules) - tested}"


@needs_promtool
def test_the_grafana_dashboard_queries_parse_and_name_exported_metrics(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    exported = exported_names()
    for query in queries:
        unknown = set(METRIC.findall(query)) - exported
        assert not unknown, f"{query}: not exported: {unknown}"
    # Grafana's variables replaced by values; promtool parses each query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query_{i}",
                        "expr": q.replace("$job", "scaler").replace("$service", ".*"),
                    }
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(queries)} rules found" in promtool("check", "rules", str(path))
