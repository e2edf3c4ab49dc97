"""The whole Compose stack for the stack-level chaos scenarios, brought up once and shared.

The same compose files an operator runs (compose.yaml + compose.prod.yaml) plus a test-only
override that publishes Redis and PostgreSQL on ephemeral loopback ports, under a project named
``cst-test-chaos-<id>``. The scaler runs a short-window policy from a writable copy (so a scenario
can write a malformed one and SIGHUP it), and reaches the Docker engine through the stack's
engine gate, whose socket is a proxy the test can cut. Bursts are sent from the test process
through the application's own Celery app; effects are read from the stack's PostgreSQL; the
broker is read where kombu keeps its lists.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil
import redis
from docker_socket_proxy import DockerSocketProxy
from exactly_once import PostgresEffects, RedisBroker, Verdict, send_burst, verdict

from services.application import ServiceApp, create_app
from services.config import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import (
    COMPOSE_DIR,
    ComposeProject,
    docker_socket_gid,
    ensure_wheelhouse,
    free_port,
    fresh_env_file,
    read_env,
    wait_until,
)
from compose_project import docker_engine_available as docker_engine_available

WORKERS = ("worker-default", "worker-cpu", "worker-io", "worker-priority", "worker-scheduled")
IO_SERVICE = "worker-io"
IO_QUEUE = "io_intensive"
WAIT_TASK = "tasks.io_intensive.wait"
FILES = (
    COMPOSE_DIR / "compose.yaml",
    COMPOSE_DIR / "compose.prod.yaml",
    Path(__file__).with_name("compose.stack-chaos.yaml"),
)
# Short windows so each scenario scales within seconds. The visibility timeout is the one the
# stack ships (an hour): a dead worker's tasks must come back through the scaler's restore
# (scaler.restore), not through kombu's sweep. A 10 s hard time limit (stop grace above it), and
# a 3 s lease: a standby takes over in ~4 s.
SETTINGS = {
    # Its own tag per checkout when two runs share an engine (CHAOS_APP_IMAGE): a run's clones
    # start from the tag, so another run rebuilding it would swap the code under this one.
    "APP_IMAGE": os.environ.get("CHAOS_APP_IMAGE", "celery-stack/app:chaos"),
    "IO_CONCURRENCY": "4",
    "CELERY_TASK_TIME_LIMIT": "10",
    "CELERY_TASK_SOFT_TIME_LIMIT": "8",
    "WORKER_STOP_GRACE_SECONDS": "12",
    "SCALER_LEASE_S": "3",
    "LOG_LEVEL": "INFO",
}
POLICY = """\
# The stack chaos suite's policy: windows of seconds; worker-io (4 threads) scales 1..3.
interval_s: 1.0
stale_after_s: 6.0
unresponsive_after_s: 10  # worker-io's heartbeat: every 2 s (compose.stack-chaos.yaml)
host: {cpu_percent: 100, memory_percent: 95}
defaults:
  min_replicas: 1
  max_replicas: 2
  target: {tasks_per_replica: 10, tolerance: 0.1}
  scale_up: {stabilization_s: 0, cooldown_s: 2, max_step: 4, max_step_percent: 100}
  scale_down: {stabilization_s: 6, cooldown_s: 2, max_step: 4}
  resources: {cpu_percent: 100, memory_percent: 95}
services:
  worker-default: {queues: [default]}
  worker-cpu: {queues: [cpu_intensive]}
  worker-io:
    queues: [io_intensive]
    max_replicas: 3
    target: {tasks_per_replica: 4}
  worker-priority: {queues: [priority]}
  worker-scheduled: {queues: [scheduled]}
"""


@dataclass
class ChaosStack:
    """The running stack and the handles a scenario needs."""

    project: ComposeProject
    proxy: DockerSocketProxy
    policy_file: Path
    values: dict[str, str]
    redis_port: int = 0
    postgres_port: int = 0
    app: ServiceApp | None = None
    stopped_standby: bool = True
    _effects: PostgresEffects | None = field(default=None, repr=False)

    # -- addresses -------------------------------------------------------------------------
    @property
    def broker_url(self) -> str:
        """As a producer connects: Redis's `worker` user (no access to the scaler's keys)."""
        return (
            f"redis://worker:{self.values['REDIS_WORKER_PASSWORD']}@127.0.0.1:{self.redis_port}/0"
        )

    @property
    def records_url(self) -> str:
        return (
            f"redis://worker:{self.values['REDIS_WORKER_PASSWORD']}@127.0.0.1:{self.redis_port}/1"
        )

    @property
    def database_url(self) -> str:
        v = self.values
        return (
            f"postgresql://{v.get('POSTGRES_USER', 'celery')}:{v['POSTGRES_PASSWORD']}"
            f"@127.0.0.1:{self.postgres_port}/{v.get('POSTGRES_DB', 'celery')}"
        )

    @property
    def effects(self) -> PostgresEffects:
        if self._effects is None:
            self._effects = PostgresEffects(self.database_url)
        return self._effects

    def connect(self) -> None:
        """Find the published ports and make the client app (the stack's own settings)."""
        self.redis_port = int(self.project.run("port", "redis", "6379").stdout.rsplit(":", 1)[1])
        self.postgres_port = int(
            self.project.run("port", "postgres", "5432").stdout.rsplit(":", 1)[1]
        )
        env = {
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_RESULT_BACKEND": self.records_url,
            "DATABASE_URL": self.database_url,
            **{k: v for k, v in SETTINGS.items() if k.startswith("CELERY_")},
        }
        self.app = create_app(load_settings(env), main="stack-chaos-client")

    # -- the scaler over HTTP --------------------------------------------------------------
    def http(
        self, path: str, method: str = "GET", body: bytes = b"", standby: bool = False
    ) -> tuple[int, str]:
        port = self.values["SCALER_STANDBY_HTTP_PORT_HOST" if standby else "SCALER_HTTP_PORT_HOST"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", method=method, data=body or None
        )
        if method == "POST":
            request.add_header("Authorization", f"Bearer {self.values['SCALER_TOKEN']}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def status(self, standby: bool = False) -> dict[str, Any]:
        code, body = self.http("/status", standby=standby)
        assert code == 200, f"/status answered {code}: {body[:300]}"
        result: dict[str, Any] = json.loads(body)
        return result

    # -- containers ------------------------------------------------------------------------
    def running(self, service: str) -> list[str]:
        """Names of the service's running containers (Compose's and the scaler's clones)."""
        out = subprocess.run(
            ["docker", "ps", "--format", "{{.Names}}",
             "--filter", f"label=com.docker.compose.project={self.project.name}",
             "--filter", f"label=com.docker.compose.service={service}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return sorted(out.split())

    def docker(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def container(self, service: str, number: int = 1) -> str:
        return f"{self.project.name}-{service}-{number}"

    # -- who holds what (services.ownership's owner hash) ------------------------------------
    def broker(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker_url, socket_timeout=5)

    def node_of(self, container: str) -> str:
        """The Celery node name of a worker container (start-worker.sh: ``$QUEUE@%h``)."""
        hostname = self.docker("inspect", "-f", "{{.Config.Hostname}}", container).strip()
        return f"{IO_QUEUE}@{hostname}"

    def held(self, node: str) -> list[str]:
        """Task ids of the unacked messages ``node`` holds (by the owner hash)."""
        client = self.broker()
        try:
            tags = [t for t, n in client.hgetall("unacked_owner").items() if n.decode() == node]
            entries = client.hmget("unacked", tags) if tags else []
        finally:
            client.close()
        return [json.loads(e)[0]["headers"]["id"] for e in entries if e is not None]

    def busy_container(self, ids: list[str], exclude: tuple[str, ...] = ()) -> tuple[str, str]:
        """(container, node) of a running worker-io replica holding tasks of ``ids``."""
        wanted = set(ids)

        def pick() -> tuple[str, str] | None:
            for name in self.running(IO_SERVICE):
                if name in exclude:
                    continue
                node = self.node_of(name)
                if wanted & set(self.held(node)):
                    return name, node
            return None

        found: tuple[str, str] = wait_until("a busy worker-io replica", pick, deadline_s=30,
                                            every_s=0.1)  # fmt: skip
        return found

    def freeze_holding_full(
        self, container: str, node: str, ids: list[str], deadline_s: float = 30
    ) -> list[str]:
        """SIGSTOP the worker at a moment it holds its full prefetch (IO_CONCURRENCY messages,
        multiplier 1); the task ids it holds, frozen as they are.

        kombu's Redis consumer BRPOPs a message (gone from the list) and only then writes it to
        ``unacked`` (and its owner entry): a worker killed in between loses that message, for
        kombu's visibility-timeout sweep and for the scaler's restore alike (docs/reliability.md,
        limits). A worker holding its full prefetch has no BRPOP outstanding, so a kill while it
        is frozen so leaves nothing in that window: what it held is exactly what comes back."""
        full = int(SETTINGS["IO_CONCURRENCY"])
        wanted = set(ids)
        deadline = time.monotonic() + deadline_s
        while True:
            self.freeze(container, signal.SIGSTOP)
            held = [t for t in self.held(node) if t in wanted]  # this burst's: its credit
            if len(held) == full:
                return held
            self.freeze(container, signal.SIGCONT)
            if time.monotonic() > deadline:
                raise AssertionError(f"{container} never held {full} messages: last {held}")
            time.sleep(0.15)

    def freeze(self, container: str, sig: signal.Signals = signal.SIGSTOP) -> None:
        """Send ``sig`` to every process of the container (SIGSTOP: frozen, still 'running')."""
        pid = int(self.docker("inspect", "-f", "{{.State.Pid}}", container).strip())
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            proc.send_signal(sig)

    # -- bursts and verdicts ---------------------------------------------------------------
    def burst(self, scenario: str, n: int, duration: float) -> list[str]:
        """Send N io tasks with unique ids (the id is also the task id and the effect key)."""
        assert self.app is not None
        run = uuid.uuid4().hex[:6]
        ids = [f"stack-{scenario}-{run}-{i:03d}" for i in range(n)]
        send_burst(self.app, WAIT_TASK, ids, lambda t: {"duration": duration, "key": t})
        return ids

    def settle(self, ids: list[str], timeout: float) -> Verdict:
        """Wait until every id has its effect and the broker holds nothing; then the verdict."""
        broker = RedisBroker(self.broker_url, "")
        try:
            try:
                wait_until(
                    f"all {len(ids)} tasks have their effect",
                    lambda: len(self.effects.counts(ids)) == len(ids),
                    deadline_s=timeout,
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.missing_report(ids)}") from None
            wait_until(
                "nothing waiting or unacked on the broker",
                lambda: broker.waiting([IO_QUEUE]) == 0 and broker.unacked() == 0,
                deadline_s=30,
            )
            return verdict(self.effects, broker, ids, [IO_QUEUE])
        finally:
            broker.close()

    def missing_report(self, ids: list[str]) -> str:
        """Where the ids without an effect are: failure records, broker lists, unacked."""
        missing = set(ids) - set(self.effects.counts(ids))
        lines = [f"{len(missing)} without an effect: {sorted(missing)[:5]}"]
        records = redis.Redis.from_url(self.records_url, socket_timeout=5)
        client = self.broker()
        try:
            for raw in cast(list[bytes], records.lrange("task_failures", 0, -1)):
                record = json.loads(raw)
                if record.get("task_id") in missing:
                    lines.append(f"failed: {record}")
            # SCAN, not KEYS: the clients' Redis user (worker) may not run KEYS (a dangerous
            # command), and a report that raises hides the failure it was written to explain.
            keys = []
            for key in sorted(cast(list[bytes], list(client.scan_iter("*")))):
                try:
                    kind = client.type(key).decode()
                except redis.exceptions.NoPermissionError:
                    continue  # the scaler's keys (scaler:*, leader:*): not the worker user's
                keys.append(key)
                size = {"list": client.llen, "hash": client.hlen, "zset": client.zcard}.get(kind)
                lines.append(f"broker key {key!r} ({kind}){f': {size(key)}' if size else ''}")
            for key in keys:
                if client.type(key) == b"list":
                    for raw in cast(list[bytes], client.lrange(key, 0, -1)):
                        task_id = json.loads(raw).get("headers", {}).get("id")
                        if task_id in missing:
                            lines.append(f"{task_id} waiting in {key!r}")
        finally:
            records.close()
            client.close()
        return "\n".join(lines)

    def give_back_lost_acks(self, ids: list[str], wait_s: float = 5) -> list[str]:
        """Once every id has its effect: entries of ``ids`` still in ``unacked`` after
        ``wait_s`` are acks that never reached Redis (the task finished while Redis was down).
        kombu's visibility-timeout sweep gives such an entry back after the timeout (an hour as
        shipped) and the idempotent effect absorbs the second run; this does that sweep's step
        (kombu's own ``restore_by_tag``) now. Returns the task ids given back."""
        wanted = set(ids)
        client = self.broker()
        try:

            def stranded() -> dict[bytes, str]:
                entries = cast(dict[bytes, bytes], client.hgetall("unacked"))
                found = {tag: json.loads(raw)[0]["headers"]["id"] for tag, raw in entries.items()}
                return {tag: task for tag, task in found.items() if task in wanted}

            deadline = time.monotonic() + wait_s
            while (left := stranded()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not left:
                return []
            assert self.app is not None
            with self.app.connection_for_write() as conn:
                qos = conn.default_channel.qos
                for tag in left:
                    qos.restore_by_tag(tag.decode())
            return sorted(left.values())
        finally:
            client.close()

    def healthy(self, deadline_s: float = 60) -> float:
        """Wait for a healthy stack: every worker service running >= 1 replica as the scaler
        sees it (serving, plus its warm pool), the scaler healthy with no errors; returns the
        seconds it took."""
        started = time.monotonic()

        def ok() -> bool:
            if self.http("/healthz")[0] != 200:
                return False
            s = self.status()
            if s["errors"] or s.get("policy_error"):
                return False
            for w in WORKERS:
                svc = s["services"].get(w, {})
                current = svc.get("current")
                if not current or current + int(svc.get("warm") or 0) != len(self.running(w)):
                    return False
            return True

        wait_until("the stack is healthy again (scaler ok, every service running)", ok,
                   deadline_s=deadline_s)  # fmt: skip
        return round(time.monotonic() - started, 2)

    def at_min(self, deadline_s: float = 60) -> None:
        """worker-io back at its minimum (one replica), seen by the scaler and the engine."""
        wait_until(
            f"{IO_SERVICE} back to 1 replica",
            lambda: (
                len(self.running(IO_SERVICE)) == 1
                and self.status()["services"][IO_SERVICE]["current"] == 1
            ),
            deadline_s=deadline_s,
        )

    def write_policy(self, text: str) -> None:
        """Rewrite the mounted policy in place (a rename would leave the bind mount on the old
        file) and SIGHUP the scaler."""
        with self.policy_file.open("r+") as f:
            f.seek(0)
            f.write(text)
            f.truncate()
        self.project.run("kill", "-s", "SIGHUP", "scaler")


@contextmanager
def chaos_stack(directory: Path) -> Iterator[ChaosStack]:
    """Build and start the stack; ``down -v`` and the proxy closed on the way out."""
    gid = docker_socket_gid()
    proxy = DockerSocketProxy(directory / "docker.sock", gid=int(gid))
    policy_file = directory / "policy.yaml"
    policy_file.write_text(POLICY)
    policy_file.chmod(0o644)
    settings = {
        **SETTINGS,
        "SCALER_HTTP_PORT_HOST": str(free_port()),
        "SCALER_STANDBY_HTTP_PORT_HOST": str(free_port()),
        "CHAOS_REDIS_PORT": str(free_port()),
        "CHAOS_POSTGRES_PORT": str(free_port()),
        "DOCKER_GID": gid,
        "DOCKER_SOCKET": str(proxy.path),
        "SCALER_POLICY_FILE": str(policy_file),
    }
    env_file = fresh_env_file(directory, settings)
    project = ComposeProject(
        name=f"{os.environ.get('CHAOS_PROJECT_PREFIX', 'cst-test-chaos-')}{uuid.uuid4().hex[:8]}",
        env_file=env_file,
        files=FILES,
        env={**os.environ, **settings},
    )
    stack = ChaosStack(project, proxy, policy_file, {**read_env(env_file), **settings})
    proxy.start()
    try:
        ensure_wheelhouse()
        project.run("build", timeout=900)
        project.run("up", "--detach", "--wait", "--wait-timeout", "180", timeout=300)
        stack.connect()
        yield stack
    except BaseException:
        print(project.diagnostics())
        raise
    finally:
        if stack.app is not None:
            stack.app.close()
        project.down()
        proxy.close()
