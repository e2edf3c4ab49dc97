"""A flight recorder of task arrivals: per-queue counts over time, replayable by `scaler simulate`.

The app publishes a ``task-sent`` event for every task (``task_send_sent_event``); the recorder
listens for those with Celery's own event receiver, on a connection of the app (Redis or RabbitMQ
alike), in a daemon thread that reconnects with backoff when the broker drops. Arrivals are
counted in buckets of ``resolution_s`` (1 s) by the event's publish timestamp, and every few
seconds the closed buckets are appended to the file as trace rows ``t,queue,count``, t being
seconds since the epoch in the segment's header::

    # scaler flight recorder: started 2024-05-01T12:00:00+00:00, epoch 1714564800.0, resolution 1
    t,queue,count
    0,io_intensive,12
    1,io_intensive,3
    1,priority,1

Every start (and every rotation) begins a new segment with its own header, so one file may hold
several. When the file would pass ``max_bytes`` it becomes ``FILE.1`` (the previous ``FILE.1`` is
dropped) and a new ``FILE`` begins: at most about twice the cap on disk. ``export_trace`` merges
``FILE.1`` and ``FILE`` into one trace that starts at t=0, the format ``scaler simulate --trace``
reads. ``FILE.lock`` (flock) admits one writer per file: a second recorder (an HA standby) waits,
and takes over when the first one's process ends.

The recorder never stops the scaler: if events cannot be received it says so in ``status()`` and
the log (``state`` "disconnected", the error, since when) and keeps retrying.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

RECORD_FILE_ENV = "SCALER_RECORD_FILE"
RECORD_MAX_MB_ENV = "SCALER_RECORD_MAX_MB"
RECORD_RESOLUTION_ENV = "SCALER_RECORD_RESOLUTION_S"
DEFAULT_MAX_MB = 64.0
DEFAULT_RESOLUTION_S = 1.0
HEADER_PREFIX = "# scaler flight recorder: "
COLUMNS = "t,queue,count"
_HEADER_RE = re.compile(
    re.escape(HEADER_PREFIX) + r"started (?P<iso>[^,]*), epoch (?P<epoch>[-+0-9.eE]+), "
    r"resolution (?P<res>[-+0-9.eE]+)\s*$"
)

log = logging.getLogger("scaler.recorder")


class RecorderError(ValueError):
    """A recorder setting is unusable; the message names the flag/variable and what was expected."""


def _fmt(t: float) -> str:
    """Seconds without float noise: 12, 12.5, 0.25."""
    text = f"{t:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


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
        mb = _positive(max_mb, DEFAULT_MAX_MB, f"--record-max-mb / {RECORD_MAX_MB_ENV}",
                       "a size in megabytes > 0", problems)  # fmt: skip
        res = _positive(resolution_s, DEFAULT_RESOLUTION_S,
                        f"--record-resolution / {RECORD_RESOLUTION_ENV}",
                        "a bucket width in seconds > 0", problems)  # fmt: skip
        target = Path(path)
        problem = _unwritable(target)
        if problem:
            problems.append(
                f"--record / {RECORD_FILE_ENV}={str(path)!r}: {problem} (expected a file path "
                "the scaler can create and append to)"
            )
        if problems:
            raise RecorderError("; ".join(problems))
        return cls(target, max(1, int(mb * 1024 * 1024)), res)


def _positive(
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


def _unwritable(path: Path) -> str | None:
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
        return f"{_fmt((index - self._base) * self.resolution_s)},{queue},{count}\n"

    def _append(self, text: str) -> None:
        assert self._out is not None
        if text:
            self._out.write(text)
            self._out.flush()

    def _header(self) -> str:
        start = self.epoch + self._base * self.resolution_s
        return (
            f"{HEADER_PREFIX}started {_iso(start)}, epoch {start!r}, "
            f"resolution {_fmt(self.resolution_s)}\n{COLUMNS}\n"
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


class FlightRecorder:
    """Records ``task-sent`` arrivals of ``app``'s broker into ``settings.path``.

    ``start()`` opens the file and starts two daemon threads (receive; flush every
    ``flush_interval_s``); ``stop()`` ends them and writes what is left. ``status()`` is a
    JSON-ready dict: ``state`` is one of "starting", "waiting-for-lock" (another recorder writes
    this file), "connecting", "connected", "disconnected" (with ``error`` and ``since``; it stays
    so while reconnecting, a changed error logged once), "stopped".
    """

    #: An event stamped further than this from its receipt (a skewed publisher clock) is
    #: counted at its receipt time instead.
    MAX_SKEW_S = 60.0

    def __init__(self, app: Any, settings: RecorderSettings, clock: Any = time.time) -> None:
        self.app, self.settings, self.clock = app, settings, clock
        self.trace = TraceFile(
            settings.path, settings.max_bytes, settings.resolution_s, clock(), settings.grace_s
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_file: IO[str] | None = None
        self._state_lock = threading.Lock()
        self.state = "starting"
        self.error: str | None = None
        self.since = self.trace.epoch
        self.events = 0
        self.connects = 0
        self.last_event_at: float | None = None
        self._iterations = 0

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("receive", self._receive_loop), ("flush", self._flush_loop)):
            thread = threading.Thread(target=target, name=f"recorder-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the threads and append every bucket still open (the final flush)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        if self._lock_file is not None:
            self._final_flush()
            self.trace.close()
            self._lock_file.close()  # releases the flock: a waiting recorder takes over
            self._lock_file = None
        self._set("stopped")

    def status(self) -> dict[str, Any]:
        with self._state_lock:
            return {
                "state": self.state,
                "error": self.error,
                "since": self.since,
                "file": str(self.settings.path),
                "max_bytes": self.settings.max_bytes,
                "resolution_s": self.settings.resolution_s,
                "events": self.events,
                "last_event_at": self.last_event_at,
                "rows_written": self.trace.rows_written,
                "late_events": self.trace.late,
                "rotations": self.trace.rotations,
                "connects": self.connects,
            }

    def _set(self, state: str, error: str | None = None) -> None:
        with self._state_lock:
            changed = (state, error) != (self.state, self.error)
            if state != self.state:
                self.since = self.clock()
            self.state, self.error = state, error
        if changed:
            level = (
                logging.WARNING if state in ("disconnected", "waiting-for-lock") else logging.INFO
            )
            log.log(level, json.dumps({"event": f"recorder-{state}", "error": error,
                                       "file": str(self.settings.path)}))  # fmt: skip

    # -- the threads --------------------------------------------------------------------------

    def _acquire_file(self) -> bool:
        """Take FILE.lock (one writer per file) and open the segment; False if another has it."""
        lock = Path(f"{self.settings.path}.lock").open("a")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return False
        self.trace.epoch = self.clock()  # t counts from when this recorder began writing
        self.trace.open()
        self._lock_file = lock
        return True

    def _receive_loop(self) -> None:
        first, cap = self.settings.backoff_s
        delay = first
        while not self._stop.is_set():
            if self._lock_file is None:
                try:
                    acquired = self._acquire_file()
                except OSError as exc:
                    self._set("disconnected", f"cannot write {self.settings.path}: {exc}")
                    self._stop.wait(cap)
                    continue
                if not acquired:
                    self._set("waiting-for-lock", f"another recorder writes {self.settings.path}")
                    self._stop.wait(cap)
                    continue
            if self.state != "disconnected":  # retries stay "disconnected" until one succeeds
                self._set("connecting")
            try:
                self._capture()
                delay = first
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self.state == "connected":
                    delay = first
                self._set("disconnected", f"{type(exc).__name__}: {exc}")
                self._stop.wait(delay)
                delay = min(delay * 2, cap)

    def _capture(self) -> None:
        recorder = self
        base = self.app.events.Receiver

        class Receiver(base):  # type: ignore[misc, valid-type]
            connect_max_retries = 0  # fail fast; the recorder's own loop backs off

            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                recorder._iterations = 0
                with recorder._state_lock:
                    recorder.connects += 1

            def on_iteration(self) -> None:
                # The Redis transport subscribes during the first drain after consume-ready, so
                # "connected" is reported only after that drain returned.
                recorder._iterations += 1
                if recorder._iterations == 2:
                    recorder._set("connected")
                if recorder._stop.is_set():
                    self.should_stop = True

        with self.app.connection_for_read() as conn:
            receiver = Receiver(
                conn, handlers={"task-sent": self._on_sent}, routing_key="task.sent"
            )
            for _ in receiver.itercapture(limit=None, timeout=None, wakeup=False):
                pass

    def _on_sent(self, event: Mapping[str, Any]) -> None:
        try:
            queue = str(event.get("queue") or event.get("routing_key") or "unknown")
            received = float(event.get("local_received") or self.clock())
            stamp = float(event.get("timestamp") or received)
            if abs(stamp - received) > self.MAX_SKEW_S:
                stamp = received
            self.trace.add(queue, stamp)
            with self._state_lock:
                self.events += 1
                self.last_event_at = stamp
        except Exception:  # a malformed event must not end the capture
            log.exception(json.dumps({"event": "recorder-bad-event"}))

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            if self._lock_file is None:
                continue
            try:
                self.trace.flush(self.clock())
            except OSError as exc:
                log.error(json.dumps({"event": "recorder-write-failed", "error": str(exc)}))

    def _final_flush(self) -> None:
        try:
            self.trace.flush(self.clock(), final=True)
        except OSError as exc:
            log.error(json.dumps({"event": "recorder-write-failed", "error": str(exc)}))


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
                    header = _HEADER_RE.match(line)
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
            f.write(f"# t=0 is {_iso(first)} (epoch {first!r})\n")
        f.write(f"{COLUMNS}\n")
        for (at, queue), n in rows:
            f.write(f"{_fmt(at - (first or 0.0))},{queue},{n}\n")
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


def add_run_flags(run: argparse.ArgumentParser) -> None:
    """`scaler run --record FILE [--record-max-mb MB] [--record-resolution S]`."""
    run.add_argument("--record", default=os.environ.get(RECORD_FILE_ENV) or None, metavar="FILE",
                     help=f"record task arrivals to FILE (default ${RECORD_FILE_ENV}; "
                     "unset: no recording)")  # fmt: skip
    run.add_argument("--record-max-mb", default=os.environ.get(RECORD_MAX_MB_ENV), metavar="MB",
                     help=f"rotate FILE to FILE.1 past this size (default ${RECORD_MAX_MB_ENV}, "
                     f"else {DEFAULT_MAX_MB:g}); at most twice this on disk")  # fmt: skip
    run.add_argument("--record-resolution", default=os.environ.get(RECORD_RESOLUTION_ENV),
                     metavar="S", help=f"bucket width in seconds (default "
                     f"${RECORD_RESOLUTION_ENV}, else {DEFAULT_RESOLUTION_S:g})")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> RecorderSettings | None:
    """The recorder settings of `scaler run`, None without --record; SystemExit if invalid."""
    if not args.record:
        return None
    try:
        return RecorderSettings.from_values(args.record, args.record_max_mb, args.record_resolution)
    except RecorderError as exc:
        raise SystemExit(str(exc)) from None


def add_record_command(sub: Any) -> None:
    """`scaler record export --file FILE [--since-hours H] --out TRACE.csv`."""
    record = sub.add_parser("record", help="the flight recorder's files (scaler run --record)")
    actions = record.add_subparsers(dest="record_command", required=True)
    export = actions.add_parser(
        "export", help="merge FILE.1 and FILE into one trace for `scaler simulate --trace`"
    )
    export.add_argument("--file", default=os.environ.get(RECORD_FILE_ENV) or None,
                        help=f"the recording (default ${RECORD_FILE_ENV})")  # fmt: skip
    export.add_argument("--since-hours", default=None, metavar="H",
                        help="keep only the last H hours before now")  # fmt: skip
    export.add_argument("--out", required=True, help="the trace CSV to write")
    export.set_defaults(func=cmd_record_export)


def cmd_record_export(args: argparse.Namespace) -> int:
    if not args.file:
        print(f"--file: no recording given (pass --file FILE or set {RECORD_FILE_ENV})",
              file=sys.stderr)  # fmt: skip
        return 1
    since: float | None = None
    if args.since_hours is not None:
        problems: list[str] = []
        since = _positive(args.since_hours, 0.0, "--since-hours", "a number of hours > 0", problems)
        if problems:
            print(problems[0], file=sys.stderr)
            return 1
    try:
        summary = export_trace(Path(args.file), Path(args.out), since)
    except OSError as exc:
        print(f"--file {args.file}: {exc}", file=sys.stderr)
        return 1
    if summary.skipped_lines:
        print(f"{args.file}: skipped {summary.skipped_lines} line(s) that were not rows of a "
              "recorded segment", file=sys.stderr)  # fmt: skip
    if not summary.rows:
        window = f" in the last {args.since_hours} h" if since is not None else ""
        print(f"{args.out}: no arrivals recorded{window}; wrote an empty trace", file=sys.stderr)
        return 1
    start = _iso(summary.first_epoch or 0.0)
    print(f"{args.out}: {summary.tasks} tasks in {summary.rows} rows, queues "
          f"{', '.join(summary.queues)}, {summary.span_s:.0f} s from {start}")  # fmt: skip
    return 0
