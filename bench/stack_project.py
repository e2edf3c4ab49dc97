"""The whole stack (compose.yaml + compose.prod.yaml) with its scaler, as a benchmark drives it.

Benchmarks 1 and 2 measure the real deployment: the stack's image, its worker services, its
scaler (Compose backend over the Docker socket) reading a policy file the benchmark rewrites and
reloads with SIGHUP. A bench-only override (fixtures/stack.bench.yaml) publishes Redis and
PostgreSQL on ephemeral loopback ports so the benchmark publishes tasks and reads effects
directly. The project is ``cst-bench-<what>-<run id>`` and is removed with its volumes on exit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import psycopg2
import redis

from bench.context import Context
from bench.polling import poll_until
from services.application import ServiceApp, create_app
from services.config import PRIORITY_SEP, PRIORITY_STEPS, load_settings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "stack.bench.yaml"


def docker_epoch(iso: str) -> float:
    """Docker's RFC 3339 time with nanoseconds -> epoch seconds."""
    head, _, frac = iso.rstrip("Z").partition(".")
    base = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return base + (float(f"0.{frac}") if frac else 0.0)


def ready_at(container_id: str) -> float | None:
    """When the container's Celery worker logged ``ready.`` (epoch seconds), None before that."""
    out = subprocess.run(["docker", "logs", "-t", container_id], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if " ready." in line:
            return docker_epoch(line.split(" ", 1)[0])
    return None


class BenchStack:
    """One running stack; use as a context manager (``down -v`` on the way out)."""

    def __init__(self, ctx: Context, what: str, settings: dict[str, str], policy: str) -> None:
        self.ctx = ctx
        self.project = ctx.name(what)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.project}-"))
        self.policy_file = self.tmp / "policy.yaml"
        self.policy_file.write_text(policy)
        self.policy_file.chmod(0o644)
        socket_path = os.environ.get("DOCKER_SOCKET", "/var/run/docker.sock")
        self.settings = {
            "APP_IMAGE": "celery-stack/app:bench",
            "PYTHON_IMAGE": ctx.python_image(),
            "REDIS_IMAGE": ctx.redis_image(),
            "POSTGRES_IMAGE": os.environ.get("POSTGRES_IMAGE", "local/postgres:15"),
            "SCALER_HTTP_PORT_HOST": "0",
            "DOCKER_SOCKET": socket_path,
            "DOCKER_GID": os.environ.get("DOCKER_GID") or str(os.stat(socket_path).st_gid),
            "SCALER_POLICY_FILE": str(self.policy_file),
            # The secret files compose.yaml mounts (written below, as `make up` writes them).
            "SECRETS_DIR": str(self.tmp / ".env.secrets"),
            **settings,
        }
        self.env_file = self.tmp / ".env"
        root = ctx.root
        subprocess.run(
            ["bash", str(root / "compose/scripts/init-env.sh"), str(root / ".env.example"),
             str(self.env_file)],
            check=True, capture_output=True,
        )  # fmt: skip
        with self.env_file.open("a") as f:
            f.writelines(f"{k}={v}\n" for k, v in self.settings.items())
        subprocess.run(
            ["bash", str(root / "compose/scripts/write-secrets.sh"), str(self.env_file),
             self.settings["SECRETS_DIR"]],
            check=True, capture_output=True,
        )  # fmt: skip
        self.values = self._read_env()
        self.app: ServiceApp | None = None
        self.redis: redis.Redis | None = None
        self.scaler_port = 0

    def _read_env(self) -> dict[str, str]:
        pairs = (ln.split("=", 1) for ln in self.env_file.read_text().splitlines() if "=" in ln)
        return {k.strip(): v.strip() for k, v in pairs if not k.startswith("#")}

    def compose(self, *args: str, timeout_s: float = 600, check: bool = True) -> str:
        root = self.ctx.root
        files = [root / "compose/compose.yaml", root / "compose/compose.prod.yaml", FIXTURE]
        cmd = ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file)]
        for file in files:
            cmd += ["-f", str(file)]
        cmd += args
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root,
            env={**os.environ, **self.settings},
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def up(self) -> None:
        if subprocess.run(["make", "--no-print-directory", "wheels"], cwd=self.ctx.root,
                          capture_output=True).returncode != 0:  # fmt: skip
            self.ctx.log("make wheels failed; the image build will try the package index")
        self.compose("build", timeout_s=900)
        self.compose("up", "-d", "--wait", "--wait-timeout", "180", timeout_s=300)
        inner = {"redis": "6379", "postgres": "5432", "scaler": "9808"}
        port = {s: int(self.compose("port", s, p).strip().rsplit(":", 1)[1])
                for s, p in inner.items()}  # fmt: skip
        v = self.values
        # As a producer connects: Redis's `worker` user.
        self.broker_url = f"redis://worker:{v['REDIS_WORKER_PASSWORD']}@127.0.0.1:{port['redis']}/0"
        self.database_url = (
            f"postgresql://{v.get('POSTGRES_USER', 'celery')}:{v['POSTGRES_PASSWORD']}"
            f"@127.0.0.1:{port['postgres']}/{v.get('POSTGRES_DB', 'celery')}"
        )
        self.scaler_port = port["scaler"]
        env = {
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_RESULT_BACKEND": self.broker_url.rsplit("/", 1)[0] + "/1",
            "DATABASE_URL": self.database_url,
        }
        self.app = create_app(load_settings(env), main="bench-client")
        self.redis = redis.Redis.from_url(self.broker_url)
        poll_until(lambda: self.status().get("role") == "leader", "the scaler to lead", 60, 0.5)

    # -- reading the stack -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.scaler_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            return cast(dict[str, Any], json.loads(response.read()))

    def running(self, service: str) -> list[str]:
        """Ids of the service's running containers (Compose's and the scaler's clones)."""
        out = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc",
             "--filter", f"label=com.docker.compose.project={self.project}",
             "--filter", f"label=com.docker.compose.service={service}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return out.split()

    def inspect(self, container_id: str) -> dict[str, Any]:
        out = subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        return cast(dict[str, Any], json.loads(out)[0])

    def all_ready(self, service: str, count: int) -> bool:
        """``count`` containers of ``service`` running, each with its worker consuming: a warm
        fleet, not just started containers (a worker needs seconds to import and connect)."""
        ids = self.running(service)
        return len(ids) == count and all(ready_at(c) is not None for c in ids)

    def publish(self, name: str, calls: list[tuple[str, dict[str, Any]]]) -> float:
        """Send ``(task_id, kwargs)`` calls of task ``name`` over one producer connection, so
        publishing is not what a benchmark measures; returns the epoch when the last was sent."""
        assert self.app is not None
        with self.app.producer_or_acquire() as producer:
            for task_id, kwargs in calls:
                self.app.send_task(name, task_id=task_id, kwargs=kwargs, producer=producer)
        return time.time()

    def depth(self, queue: str) -> int:
        """Messages waiting in every priority list of ``queue`` (kombu's Redis layout)."""
        assert self.redis is not None
        keys = [queue] + [f"{queue}{PRIORITY_SEP}{s}" for s in PRIORITY_STEPS if s]
        pipe = self.redis.pipeline()
        for key in keys:
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())

    def purge(self, queue: str) -> None:
        assert self.redis is not None
        self.redis.delete(queue, *[f"{queue}{PRIORITY_SEP}{s}" for s in PRIORITY_STEPS if s])

    def effects(self, where: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of (task_id, hostname, start epoch, end epoch) of task_effects matching."""
        conn = psycopg2.connect(self.database_url, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT task_id, hostname,"
                    " extract(epoch FROM created_at) - coalesce((payload->>'waited_s')::float, 0),"
                    " extract(epoch FROM created_at) FROM task_effects WHERE " + where,
                    args,
                )
                return list(cur.fetchall())
        finally:
            conn.close()

    def count_done(self, prefix: str) -> int:
        conn = psycopg2.connect(self.database_url, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM task_effects WHERE task_id LIKE %s",
                            (prefix + "%",))  # fmt: skip
                row = cur.fetchone()
                return int(row[0]) if row else 0
        finally:
            conn.close()

    def set_policy(self, text: str) -> None:
        """Rewrite the mounted policy in place and SIGHUP the scaler; wait until it is in force."""
        before = self.status().get("policy_loaded_at")
        with self.policy_file.open("r+") as f:
            f.seek(0)
            f.write(text)
            f.truncate()
        self.compose("kill", "-s", "SIGHUP", "scaler")

        def loaded() -> bool:
            s = self.status()
            if s.get("policy_error"):
                raise RuntimeError(f"the scaler refused the policy: {s['policy_error']}")
            return s.get("policy_loaded_at") != before

        poll_until(loaded, "the scaler to load the new policy", 60, 0.3)

    def scaler_logs(self, since: float) -> list[dict[str, Any]]:
        """The scaler's JSON log records since ``since`` (epoch seconds)."""
        out = self.compose("logs", "--no-color", "--no-log-prefix", "--since",
                           f"{since - 1:.0f}", "scaler")  # fmt: skip
        records = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return [r for r in records if r.get("ts", 0) >= since - 1]

    def wait_replicas(self, service: str, count: int, timeout_s: float = 120) -> None:
        poll_until(lambda: len(self.running(service)) == count,
                   f"{service} at {count} replicas", timeout_s, 0.5)  # fmt: skip

    def __enter__(self) -> BenchStack:
        try:
            self.up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.app is not None:
            self.app.close()
        if self.redis is not None:
            self.redis.close()
        self.compose("--profile", "ha", "down", "-v", "-t", "5", "--remove-orphans", check=False)
