"""The figures each chaos scenario reports, appended to the JSON file named by CHAOS_REPORT.

docs/reliability.md is generated from that file by tests/chaos/report.py, so the document shows the
figures of one real run rather than numbers typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPORT_ENV = "CHAOS_REPORT"


@dataclass
class Figures:
    """One scenario on one broker: what was sent, what came out, how long recovery took."""

    scenario: str
    broker: str
    fault: str = ""
    sent: int = 0
    done: int = 0
    lost: int = 0
    duplicated_effects: int = 0
    absorbed_redeliveries: int | None = None
    recovery_s: float | None = None
    recovery_means: str = ""
    notes: list[str] = field(default_factory=list)
    outcome: str = "unknown"

    def count(self, sent: int, done: int, lost: int, duplicated: int) -> None:
        self.sent, self.done, self.lost, self.duplicated_effects = sent, done, lost, duplicated


def append(figures: Figures, path: Path | None = None) -> None:
    """Add one scenario's figures to the report file (no-op when CHAOS_REPORT is unset)."""
    target = path or (Path(os.environ[REPORT_ENV]) if os.environ.get(REPORT_ENV) else None)
    if target is None:
        return
    document: dict[str, Any] = {"machine": {}, "scenarios": []}
    if target.exists() and target.stat().st_size:
        document = json.loads(target.read_text())
    document["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    scenarios = document["scenarios"]
    assert isinstance(scenarios, list)
    scenarios.append(asdict(figures))
    target.write_text(json.dumps(document, indent=2) + "\n")
