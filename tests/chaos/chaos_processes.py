"""Real processes the chaos suite starts, signals, kills and restarts.

Celery workers and beat run as ``python -m celery -A services.celery_app ...`` in their own
process group, as in a container. Redis and PostgreSQL servers of the suite's own run on free
loopback ports (never the shared ones) so they can be killed and restarted on the same port.
Everything here is stopped by its owner's fixture in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TypeVar

import psutil
import redis
from support.polling import poll_until

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    """A loopback port nobody listens on right now (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    """One ``celery worker`` (main process and pool children), logging to a file."""

    def __init__(
        self,
        env: dict[str, str],
        queues: list[str],
        log_path: Path,
        concurrency: int = 1,
        name: str | None = None,
        pool: str = "prefork",
    ) -> None:
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "services.celery_app",
            "worker",
            "-Q",
            ",".join(queues),
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-n",
            f"{self.name}@%h",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "INFO",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            return " ready." in self.log()

        poll_until(ready, f"worker {self.name} ready", timeout)

    def children(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: signal.Signals) -> None:
        """Signal the main process only, as tini does in a container."""
        if self.alive:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails (the worker is still running) after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Celery's SIGUSR1 handler logs every thread's stack: where the shutdown hangs.
            before = len(self.log())
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(AssertionError):
                poll_until(lambda: len(self.log()) > before, "the stack dump", 5)
            raise AssertionError(
                f"worker {self.name} still running {timeout}s after the signal:\n{self.log()}"
            ) from None

    def terminate(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM to the main process) and wait for the exit."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as ``docker kill`` does to a container."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def cleanup(self) -> None:
        if self.alive:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # and any orphaned pool child
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


class BeatProcess:
    """``celery beat`` with its schedule file on disk, like beat with a volume."""

    def __init__(self, env: dict[str, str], schedule_file: Path, log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "services.celery_app",
                "beat",
                "-s",
                str(schedule_file),
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, sig: signal.Signals, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def cleanup(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


class RedisServer:
    """A redis-server of the test's own with AOF, restartable on the same port with its data."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server: not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) on the same port and directory; returns once it answers PING."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",  # as the stack runs it
                "--save",
                "",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited {self.proc.returncode}")
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        try:
            poll_until(answers, f"redis-server on port {self.port}", timeout_s=20)
        finally:
            client.close()

    def restart(self, down_s: float = 0.0) -> None:
        """SIGTERM (Redis's own shutdown: the AOF flushed, clients closed), then start again on
        the same port and directory, at once as ``docker restart`` does, or after ``down_s``
        seconds down (the nemesis campaign's restarts answered again after 1.6 to 5.7 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        time.sleep(down_s)  # the outage's length, a fault parameter (not a synchronisation)
        self.start()

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what reached the AOF survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.kill()


class PostgresServer:
    """A PostgreSQL cluster of the test's own (initdb in a temp dir), stoppable mid-burst.

    Never the shared server: that one is managed by pg_ctlcluster and other tests use it.
    """

    def __init__(self) -> None:
        bindir = _postgres_bindir()
        self.initdb = str(bindir / "initdb")
        self.pg_ctl = str(bindir / "pg_ctl")
        self.root = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, user="postgres")
        self._run([self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])

    def _run(self, cmd: list[str]) -> None:
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "postgres.log")
        self._run([self.pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "start"])

    def stop(self) -> None:
        """Fast shutdown: open sessions are terminated, as in a restart of the server."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bindir() -> Path:
    """The directory with initdb and pg_ctl (Debian keeps them out of PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not candidates:
        raise FileNotFoundError("initdb: not on PATH nor in /usr/lib/postgresql/*/bin")
    return candidates[0].parent
