"""The flight recorder's threads: Celery task-sent events in, closed buckets out to the file."""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from scaler.recorder.settings import RecorderSettings
from scaler.recorder.tracefile import TraceFile

log = logging.getLogger("scaler.recorder")


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
