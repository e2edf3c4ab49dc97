"""Redis's users and memory bound exactly as compose.yaml configures them, on a real redis-server.

The redis service's command is taken from `docker compose config` (so the test checks the file,
not a copy of it) and run by a redis-server of the test's own on a free loopback port: no Docker
engine is needed, and the shared Redis is never touched. The stack-level check (every client of a
running stack served without one refusal) is in test_stack_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kombu.exceptions
import pytest
import redis
from compose_project import COMPOSE_DIR, ROOT, free_port, wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

from scaler.control import ControlStore, ControlUnavailable
from scaler.leader import LeaderLease
from scaler.restore import UnackedRestorer
from scaler.wakeup import Alarm, Watch, detector_for_app
from services.application import create_app
from services.config import load_settings

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None
    or shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="REDIS ACL TESTS SKIPPED: needs redis-server and the `docker compose` CLI",
)

LIMITS = {"worker-io": 8}


@dataclass
class AclRedis:
    port: int
    passwords: dict[str, str]  # user -> password, from the env file

    def url(self, user: str, db: int = 0) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/{db}"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), socket_timeout=5)

    def app(self, user: str, prefix: str) -> Any:
        """The application as ``user`` connects, its keys under ``prefix``."""
        settings = {"CELERY_BROKER_URL": self.url(user), "CELERY_KEY_PREFIX": prefix,
                    "CELERY_RESULT_BACKEND": self.url(user, 1)}  # fmt: skip
        return create_app(load_settings(settings), main=f"acl-{user}")


@dataclass
class FileRedis:
    """The redis service's command as `docker compose config` resolves compose.yaml, and the
    passwords of the env file it was resolved with."""

    command: list[str]
    passwords: dict[str, str]

    def args(self, workdir: Path, port: int, *extra: str) -> list[str]:
        """The file's arguments, then what makes the server the test's own (later options win
        in redis-server; not --dir, which must exist when read)."""
        at = self.command.index("--dir")
        return [*self.command[1:at], *self.command[at + 2 :], "--dir", str(workdir),
                "--port", str(port), "--bind", "127.0.0.1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def file_redis(tmp_path_factory: pytest.TempPathFactory) -> FileRedis:
    workdir = tmp_path_factory.mktemp("acl-env")
    env_file = workdir / ".env"
    subprocess.run(
        ["bash", str(ROOT / "compose/scripts/init-env.sh"), str(ROOT / ".env.example"), env_file],
        check=True,
        capture_output=True,
    )
    values = dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if line[:1].isupper()
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env.setdefault("DOCKER_GID", "4242")
    # The secret files' directory (make sets it); only its name is needed to resolve the file.
    env["SECRETS_DIR"] = str(workdir / ".env.secrets")
    out = subprocess.run(
        ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE_DIR / "compose.yaml"),
         "config", "--format", "json"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    command = json.loads(out)["services"]["redis"]["command"]
    assert command[0] == "redis-server", command
    passwords = {u: values[f"REDIS_{u.upper()}_PASSWORD"] for u in ("worker", "scaler", "admin")}
    return FileRedis(command, passwords)


@contextmanager
def redis_server(args: list[str], server: AclRedis, log: Path | None = None) -> Iterator[None]:
    """A redis-server with ``args`` until the block ends (SIGTERM: Redis's own shutdown, as
    `docker stop` gives it)."""
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", *args], stdout=out, stderr=out
        )
    try:
        admin = server.client("admin")

        def up() -> bool:
            try:
                return bool(admin.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return proc.poll() is not None  # exited: the assert below says so

        wait_until("the test's redis-server answers", up, deadline_s=10)
        assert proc.poll() is None, f"redis-server refused the compose file's command: {args}"
        admin.close()
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def acl_redis(
    file_redis: FileRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AclRedis]:
    port = free_port()
    server = AclRedis(port, file_redis.passwords)
    workdir = tmp_path_factory.mktemp("acl")
    args = file_redis.args(workdir, port, "--appendonly", "no", "--save", "")
    with redis_server(args, server):
        yield server


def test_no_connection_works_without_a_user(acl_redis: AclRedis) -> None:
    anonymous = redis.Redis(port=acl_redis.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("anything")
    old_style = redis.Redis(port=acl_redis.port, password=acl_redis.passwords["admin"])
    with pytest.raises(redis.AuthenticationError):  # AUTH <password> is the off default user
        old_style.ping()
    # `default` holds every permission (for Redis's replay of the AOF) and cannot log in.
    for password in ("", "nopass", acl_redis.passwords["admin"]):
        as_default = redis.Redis(port=acl_redis.port, username="default", password=password)
        with pytest.raises(redis.AuthenticationError):
            as_default.ping()


def test_worker_credentials_cannot_touch_the_scalers_keys(acl_redis: AclRedis) -> None:
    """What issue 11 found a worker could do: pin a service, plant an override or a lease that
    never expires, flush everything. Each is refused; the scaler's user may do its part."""
    worker = acl_redis.client("worker")
    store = ControlStore(worker, LIMITS)
    with pytest.raises(ControlUnavailable, match="no permissions"):
        store.pin("worker-io", 0, by="a worker")
    with pytest.raises(ControlUnavailable, match="no permissions"):
        store.overrides()
    lease = LeaderLease(worker, owner="a-worker", lease_s=5)
    lease.step()
    assert not lease.is_leader() and "no permissions" in (lease.last_error or ""), lease.last_error
    for command in (
        ("SET", lease.key, "forever"),
        ("HSET", store.key, "worker-io", '{"replicas": -1}'),
        ("EVAL", "return redis.call('DEL', KEYS[1])", "1", lease.key),
        ("EVAL", f"return redis.call('DEL', '{store.key}')", "0"),  # a key not declared
        ("FLUSHDB",),
        ("SWAPDB", "0", "1"),
        ("KEYS", "*"),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("CLIENT", "KILL", "USER", "scaler"),
    ):
        with pytest.raises(redis.ResponseError) as refused:
            worker.execute_command(*command)
        assert "no permissions" in str(refused.value) or "can't access" in str(refused.value), (
            command,
            refused.value,
        )

    # Celery's keys are the workers': a queue, kombu's bookkeeping, a result, pub/sub.
    key = f"t{uuid.uuid4().hex[:6]}"
    for name in (key, f"unacked_owner{key}", f"_kombu.binding.{key}", f"lead{key}", "s"):
        assert worker.lpush(name, "m") == 1, name
        worker.delete(name)
    assert worker.publish("/0.celeryev/worker.heartbeat", "{}") == 0

    scaler = acl_redis.client("scaler")
    scaler_store = ControlStore(scaler, LIMITS)
    scaler_store.pin("worker-io", 2, by="operator")
    assert scaler_store.overrides()["worker-io"].replicas == 2
    scaler_lease = LeaderLease(scaler, owner="the-scaler", lease_s=5)
    scaler_lease.step()
    assert scaler_lease.is_leader()
    scaler_lease.release()
    scaler.delete(scaler_store.key)
    with pytest.raises(redis.exceptions.NoPermissionError):
        scaler.flushall()


def test_a_producer_at_maxmemory_gets_redis_oom_error_and_nothing_is_dropped(
    acl_redis: AclRedis,
) -> None:
    """noeviction at maxmemory: sending a task fails loudly (Redis's OOM error reaches the
    caller), and every send that returned is in the queue."""
    admin = acl_redis.client("admin")
    used = int(cast(dict[str, Any], admin.info("memory"))["used_memory"])
    admin.config_set("maxmemory", used + 2 * 1024 * 1024)  # 2 MB of room
    prefix = f"oom{uuid.uuid4().hex[:6]}:"
    app = create_app(
        load_settings(
            {
                "CELERY_BROKER_URL": acl_redis.url("worker"),
                "CELERY_RESULT_BACKEND": acl_redis.url("worker", 1),
                "CELERY_KEY_PREFIX": prefix,
            }
        ),
        main="oom-producer",
    )
    sent = 0
    try:
        # kombu wraps Redis's error in its OperationalError (what Celery callers catch).
        with pytest.raises(kombu.exceptions.OperationalError, match="maxmemory") as refused:
            for _ in range(1000):  # ~40 KB each: full long before the end
                app.send_task("tasks.default.record", args=["k", {"pad": "x" * 40_000}])
                sent += 1
        assert isinstance(refused.value.__cause__, redis.exceptions.OutOfMemoryError)
        assert 0 < sent < 1000
        # The queue's lists (kombu keeps one per priority step): every send that returned.
        queued = sum(cast(int, admin.llen(k)) for k in admin.scan_iter(match=f"{prefix}default*"))
        assert queued == sent, "a send that returned is in the queue"
    finally:
        admin.config_set("maxmemory", 0)
        for key in admin.scan_iter(match=f"{prefix}*"):
            admin.delete(key)
        app.close()


def test_the_scaler_user_hears_a_task_land_on_its_queue(acl_redis: AclRedis) -> None:
    """The file's notify-keyspace-events reach the scaler's user, which may not run CONFIG: the
    detector's probe (a push onto its own key) proves the stream, and a worker's publish onto a
    managed queue rings the armed service (scaler.wakeup)."""
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client("scaler").config_get("notify-keyspace-events")
    prefix = f"wk{uuid.uuid4().hex[:6]}:"
    scaler_app, producer = acl_redis.app("scaler", prefix), acl_redis.app("worker", prefix)
    alarm, stop = Alarm(), threading.Event()
    detector = detector_for_app(scaler_app, alarm.ring)
    detector.watch(Watch({"io_intensive": "worker-io"}, frozenset({"worker-io"})))
    detector.start()
    try:
        wait_until("the keyspace event stream", lambda: detector.up, deadline_s=10)
        producer.send_task("tasks.io_intensive.wait", kwargs={"duration": 0})
        assert alarm.wait(10.0, stop) == {"worker-io"}
    finally:
        detector.stop()
        admin = acl_redis.client("admin")
        for key in admin.scan_iter(match=f"{prefix}*"):
            admin.delete(key)
        scaler_app.close()
        producer.close()


TAKE_THREE = """
import json, os, sys
import kombu
from services import ownership
from services.application import create_app
from services.config import load_settings

url, prefix = sys.argv[1:3]
app = create_app(load_settings({"CELERY_BROKER_URL": url, "CELERY_KEY_PREFIX": prefix}))
conn = app.connection_for_write()
queue = kombu.Queue("io_intensive", routing_key="io_intensive")
held = {}
for node in ("live@h", "acked@h", "dead@h"):
    ownership.set_node(node)
    message = queue(conn.default_channel).get(no_ack=False)
    held[node] = str(message.delivery_tag)
    if node == "acked@h":
        message.ack()
print(json.dumps(held), flush=True)
os._exit(0)
"""


def test_a_restart_replays_every_transaction_of_the_aof(
    file_redis: FileRedis, tmp_path: Path
) -> None:
    """issue 18 (the nemesis campaign's losses): Redis 7 replays the AOF as the `default` user
    and re-checks ACLs at EXEC (redis/redis#14541, fixed upstream in 2025), so with `default` off
    and without permissions every MULTI/EXEC since the last rewrite was dropped on a restart:
    kombu's unacked entries and acks, the owner records and the scaler's restores (a script's
    effects are written as a transaction). A message a worker held, or one the scaler had just
    restored, was then on no list and in no hash: lost. With the file's users, as shipped
    (AOF, fsync every second, Redis's own shutdown on SIGTERM), everything is there after a
    restart and the server logs no refused transaction."""
    port = free_port()
    server = AclRedis(port, file_redis.passwords)
    args = file_redis.args(tmp_path, port)
    log = tmp_path / "redis.log"
    prefix = f"aof{uuid.uuid4().hex[:6]}:"
    worker_app, scaler_app = server.app("worker", prefix), server.app("scaler", prefix)
    try:
        with redis_server(args, server, log):
            for n in range(4):
                worker_app.send_task("tasks.io_intensive.wait", kwargs={"n": n},
                                     queue="io_intensive")  # fmt: skip
            # A worker process takes three and is gone without kombu's give-back at a clean
            # close (os._exit, as a SIGKILL): one still held, one acked, one of a dead node.
            taken = subprocess.run(
                [sys.executable, "-c", TAKE_THREE, server.url("worker"), prefix],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            assert taken.returncode == 0, taken.stderr
            held = json.loads(taken.stdout)
            restorer = UnackedRestorer.for_app(scaler_app)
            assert restorer is not None
            try:
                assert restorer.restore_nodes(["dead@h"]).restored == 1
            finally:
                restorer.close()
        with redis_server(args, server, log):  # the same directory: the AOF is read back
            admin = server.client("admin")
            try:
                unacked = cast(dict[bytes, bytes], admin.hgetall(f"{prefix}unacked"))
                owners = cast(dict[bytes, bytes], admin.hgetall(f"{prefix}unacked_owner"))
                queued = sum(  # the queue's lists, one per priority step
                    cast(int, admin.llen(key))
                    for key in admin.scan_iter(match=f"{prefix}io_intensive*", _type="list")
                )
            finally:
                admin.close()
    finally:
        worker_app.close()
        scaler_app.close()
    refused = [line for line in log.read_text().splitlines() if "NOPERM" in line]
    assert not refused, f"the restart dropped {len(refused)} transaction(s): {refused[:2]}"
    assert set(unacked) == {held["live@h"].encode()}, (unacked.keys(), held)
    assert owners == {held["live@h"].encode(): b"live@h"}
    assert queued == 2  # the one never taken and the restored one
