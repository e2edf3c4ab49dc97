"""Whole `scaler run` processes for tests (not a test module): start, read, stop, clean up.

The tests drive scalers the way an operator does: real processes reading a policy file, writing a
state file, logging JSON lines to stderr and serving HTTP; the local backend's workers are real
Celery processes that may outlive the scaler (with leader election they are meant to), so
:func:`stop_workers` ends them by their pidfiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
from prometheus_client.parser import text_string_to_metric_families
from scaler_support import free_port

from scaler.status import read_snapshot


@dataclass
class ScalerRun:
    """One `scaler run` process and where to read what it did."""

    name: str
    proc: subprocess.Popen[bytes]
    state_file: Path
    log_file: Path
    http_port: int
    _log: IO[bytes]

    def state(self) -> dict[str, Any] | None:
        """The last status snapshot, None before the first one."""
        try:
            return read_snapshot(self.state_file)
        except ValueError:
            return None

    def service(self, service: str) -> dict[str, Any]:
        """One service's row of the last snapshot ({} before the first)."""
        state = self.state() or {}
        row: dict[str, Any] = (state.get("services") or {}).get(service, {})
        return row

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        out = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def decisions(self, service: str | None = None) -> list[dict[str, Any]]:
        """The decision log lines (one per service per cycle)."""
        return [
            e
            for e in self.logs()
            if e.get("event") == "decision" and (service is None or e.get("service") == service)
        ]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics, parsed as Prometheus exposition: (name, sorted labels) -> value."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def get_json(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET an HTTP endpoint of the scaler: (status code, JSON body)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read())

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal the scaler and wait for it; SIGKILL if it will not go. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)


def start_scaler_run(
    name: str,
    policy: Path,
    workdir: Path,
    tmp_path: Path,
    env: dict[str, str],
    *extra: str,
    cwd: Path | None = None,
) -> ScalerRun:
    """`scaler run` with the local backend, its own state file, log file and HTTP port (run in
    ``cwd``, default this process's: `python -m` puts it first on the path)."""
    port = free_port()
    state = tmp_path / f"{name}.state.json"
    log_path = tmp_path / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaler.cli", "run", "--backend", "local",
         "--policy", str(policy), "--state-file", str(state), "--workdir", str(workdir),
         "--grace", "20", *extra],
        env={**env, "SCALER_HTTP_PORT": str(port)},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=cwd,
    )  # fmt: skip
    return ScalerRun(name, proc, state, log_path, port, log)


def worker_pids(workdir: Path) -> list[int]:
    """Live local-backend workers under ``workdir`` (by pidfile)."""
    pids = []
    for pidfile in workdir.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError, psutil.Error):
            pid = int(pidfile.read_text().strip())
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
    return pids


def stop_workers(workdir: Path, grace_s: float = 15.0) -> None:
    """Warm-stop every worker left under ``workdir``, then kill what remains."""
    pids = worker_pids(workdir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(max(0.1, deadline - time.monotonic()))
    for pid in worker_pids(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
