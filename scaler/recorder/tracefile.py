"""The recording on disk: bucketed rows in segments, rotation at the cap, export as one trace."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from scaler.recorder.settings import COLUMNS, HEADER_PREFIX, HEADER_RE

log = logging.getLogger("scaler.recorder")


def format_seconds(t: float) -> str:
    """Seconds without float noise: 12, 12.5, 0.25."""
    text = f"{t:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class TraceFile:
    """Buckets of arrivals, appended to the file as they close; rotates at the size cap.

    Thread-safe: ``add`` runs in the receiving thread, ``flush`` in the writer's. Bucket ``i``
    covers ``[epoch + i * res, epoch + (i + 1) * res)``; a segment's header epoch is
    ``epoch + base * res`` (base 0 for the segment a start opens, the first row's bucket after a
    rotation), and a row's t is ``(i - base) * res``.
    """

    def __init__(
        self, path: Path, max_bytes: int, resolution_s: float, epoch: float, grace_s: float = 1.0
    ) -> None:
        self.path, self.max_bytes, self.resolution_s = path, max_bytes, resolution_s
        self.epoch, self.grace_s = epoch, grace_s
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, str], int] = {}
        self._floor = 0  # buckets below this index are written; a late arrival is counted in it
        self._base = 0
        self._out: IO[str] | None = None
        self._size = 0
        self._pristine = 0  # FILE's size when it holds nothing but this segment's header
        self.rows_written = 0
        self.late = 0
        self.rotations = 0

    def open(self) -> None:
        """Append a new segment to FILE (a restart keeps what a previous run wrote)."""
        out = self.path.open("a", encoding="utf-8")
        empty = out.tell() == 0
        if not empty:  # finish a line a crash may have cut short
            with self.path.open("rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    out.write("\n")
        out.write(self._header())
        out.flush()
        self._out = out
        self._size = self.path.stat().st_size
        self._pristine = self._size if empty else 0

    def add(self, queue: str, timestamp: float, count: int = 1) -> None:
        index = math.floor((timestamp - self.epoch) / self.resolution_s)
        with self._lock:
            if index < self._floor:
                index = self._floor
                self.late += count
            key = (index, queue)
            self._buckets[key] = self._buckets.get(key, 0) + count

    def flush(self, now: float, final: bool = False) -> int:
        """Append the buckets closed by ``now`` (every one if ``final``); the rows written."""
        with self._lock:
            # Bucket i ends at epoch + (i + 1) * res; it is closed grace_s after that.
            limit = math.floor((now - self.grace_s - self.epoch) / self.resolution_s)
            ready = sorted(k for k in self._buckets if final or k[0] < limit)
            rows = [(k, self._buckets.pop(k)) for k in ready]
            self._floor = max(self._floor, limit, rows[-1][0][0] + 1 if rows else 0)
            if rows:
                self._write(rows)
            return len(rows)

    def _write(self, rows: list[tuple[tuple[int, str], int]]) -> None:
        """Append rows, rotating before the one that would take FILE past the cap."""
        if self._out is None:
            self.open()
        pending: list[str] = []
        for (index, queue), count in rows:
            line = self._line(index, queue, count)
            if self._size + len(line.encode()) > self.max_bytes and self._size > self._pristine:
                self._append("".join(pending))
                pending = []
                self._rotate(first_index=index)
                line = self._line(index, queue, count)
            pending.append(line)
            self._size += len(line.encode())
        self._append("".join(pending))
        self.rows_written += len(rows)

    def _line(self, index: int, queue: str, count: int) -> str:
        return f"{format_seconds((index - self._base) * self.resolution_s)},{queue},{count}\n"

    def _append(self, text: str) -> None:
        assert self._out is not None
        if text:
            self._out.write(text)
            self._out.flush()

    def _header(self) -> str:
        start = self.epoch + self._base * self.resolution_s
        return (
            f"{HEADER_PREFIX}started {iso_time(start)}, epoch {start!r}, "
            f"resolution {format_seconds(self.resolution_s)}\n{COLUMNS}\n"
        )

    def _rotate(self, first_index: int) -> None:
        """FILE -> FILE.1 (the older FILE.1 is dropped); FILE begins again with its own header."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f"{self.path}.1")
        self.rotations += 1
        self._base = first_index
        self.open()
        log.info(json.dumps({"event": "recorder-rotated", "file": str(self.path)}))

    def close(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None


# -- export -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    tasks: int
    queues: tuple[str, ...]
    first_epoch: float | None  # the wall-clock time of the trace's t=0
    span_s: float
    skipped_lines: int


def read_recording(path: Path) -> tuple[dict[tuple[float, str], int], int]:
    """Arrivals in FILE.1 then FILE as {(absolute time, queue): count}; lines not understood."""
    arrivals: dict[tuple[float, str], int] = {}
    skipped = 0
    for part in (Path(f"{path}.1"), path):
        if not part.exists():
            continue
        epoch: float | None = None
        with part.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                line = line.strip()
                if not line or line == COLUMNS:
                    continue
                if line.startswith("#"):
                    header = HEADER_RE.match(line)
                    if header:
                        epoch = float(header["epoch"])
                    continue
                fields = line.split(",")
                try:
                    t, queue, count = float(fields[0]), fields[1], int(fields[2])
                except (ValueError, IndexError):
                    skipped += 1
                    continue
                if epoch is None or len(fields) != 3 or not queue or count < 0:
                    skipped += 1
                    continue
                key = (round(epoch + t, 6), queue)
                arrivals[key] = arrivals.get(key, 0) + count
    return arrivals, skipped


def export_trace(
    path: Path, out: Path, since_hours: float | None = None, now: float | None = None
) -> ExportSummary:
    """Merge FILE.1 and FILE into one trace at ``out`` whose first row is t=0.

    ``since_hours`` keeps the arrivals of the last H hours before ``now`` (the wall clock).
    Raises FileNotFoundError when neither file exists.
    """
    if not path.exists() and not Path(f"{path}.1").exists():
        raise FileNotFoundError(f"{path}: no recording here (nor {path}.1)")
    arrivals, skipped = read_recording(path)
    if since_hours is not None:
        cutoff = (time.time() if now is None else now) - since_hours * 3600.0
        arrivals = {k: n for k, n in arrivals.items() if k[0] >= cutoff}
    rows = sorted((k, n) for k, n in arrivals.items() if n > 0)
    first = rows[0][0][0] if rows else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        sources = ", ".join(str(p) for p in (Path(f"{path}.1"), path) if p.exists())
        f.write(f"# exported by `scaler record export` from {sources}\n")
        if first is not None:
            f.write(f"# t=0 is {iso_time(first)} (epoch {first!r})\n")
        f.write(f"{COLUMNS}\n")
        for (at, queue), n in rows:
            f.write(f"{format_seconds(at - (first or 0.0))},{queue},{n}\n")
    os.replace(tmp, out)
    return ExportSummary(
        rows=len(rows),
        tasks=sum(n for _, n in rows),
        queues=tuple(sorted({q for (_, q), _ in rows})),
        first_epoch=first,
        span_s=(rows[-1][0][0] - first) if rows and first is not None else 0.0,
        skipped_lines=skipped,
    )


# -- command line -----------------------------------------------------------------------------
