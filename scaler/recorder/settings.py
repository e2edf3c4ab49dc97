"""Where and how the flight recorder records: validated from flags or the environment."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

RECORD_FILE_ENV = "SCALER_RECORD_FILE"
RECORD_MAX_MB_ENV = "SCALER_RECORD_MAX_MB"
RECORD_RESOLUTION_ENV = "SCALER_RECORD_RESOLUTION_S"
DEFAULT_MAX_MB = 64.0
DEFAULT_RESOLUTION_S = 1.0
HEADER_PREFIX = "# scaler flight recorder: "
COLUMNS = "t,queue,count"
HEADER_RE = re.compile(
    re.escape(HEADER_PREFIX) + r"started (?P<iso>[^,]*), epoch (?P<epoch>[-+0-9.eE]+), "
    r"resolution (?P<res>[-+0-9.eE]+)\s*$"
)


class RecorderError(ValueError):
    """A recorder setting is unusable; the message names the flag/variable and what was expected."""


@dataclass(frozen=True)
class RecorderSettings:
    """Where and how to record; built by ``from_values`` from flags or the environment."""

    path: Path
    max_bytes: int = int(DEFAULT_MAX_MB * 1024 * 1024)
    resolution_s: float = DEFAULT_RESOLUTION_S
    flush_interval_s: float = 2.0  # closed buckets are appended at most this often
    grace_s: float = 1.0  # a bucket is closed this long after its end (events in flight)
    backoff_s: tuple[float, float] = (0.5, 15.0)  # reconnect delay: first, cap (doubling)

    @classmethod
    def from_values(
        cls, path: str, max_mb: str | float | None = None, resolution_s: str | float | None = None
    ) -> RecorderSettings:
        """Validate flag or environment values; RecorderError names each one that is wrong."""
        problems: list[str] = []
        mb = positive_value(max_mb, DEFAULT_MAX_MB, f"--record-max-mb / {RECORD_MAX_MB_ENV}",
                            "a size in megabytes > 0", problems)  # fmt: skip
        res = positive_value(resolution_s, DEFAULT_RESOLUTION_S,
                             f"--record-resolution / {RECORD_RESOLUTION_ENV}",
                             "a bucket width in seconds > 0", problems)  # fmt: skip
        target = Path(path)
        problem = unwritable_reason(target)
        if problem:
            problems.append(
                f"--record / {RECORD_FILE_ENV}={str(path)!r}: {problem} (expected a file path "
                "the scaler can create and append to)"
            )
        if problems:
            raise RecorderError("; ".join(problems))
        return cls(target, max(1, int(mb * 1024 * 1024)), res)


def positive_value(
    raw: str | float | None, default: float, name: str, expected: str, problems: list[str]
) -> float:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        problems.append(f"{name}={raw!r}: expected {expected}")
        return default
    return value


def unwritable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be appended to (None if it can); creates its directory if needed."""
    if path.is_dir():
        return "is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
        with Path(f"{path}.lock").open("a"):
            pass
    except OSError as exc:
        return f"cannot write there: {exc.strerror or exc}"
    return None
