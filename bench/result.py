"""One benchmark run's outcome, saved as JSON so the report can be rebuilt without re-measuring."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    """Raw samples plus the settings they were taken with.

    ``samples`` holds every measurement (lists of numbers or of flat records), ``summary`` the
    figures the report quotes (medians, ratios), ``settings`` what was varied and held fixed, and
    ``notes`` anything a reader must know to trust the figures (a goal missed, a fallback taken).
    """

    name: str
    title: str
    started_at: float
    duration_s: float
    settings: dict[str, Any]
    samples: dict[str, Any]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write ``<directory>/<name>.json`` (replacing an earlier run's file)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Result:
        """Read a saved result; ValueError naming the file and the missing field otherwise."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable benchmark result ({exc})") from exc
        missing = [
            f for f in ("name", "title", "started_at", "duration_s", "settings", "samples",
                        "summary") if f not in data
        ]  # fmt: skip
        if missing:
            raise ValueError(f"{path}: missing field(s) {', '.join(missing)} of a benchmark result")
        return cls(**data)
