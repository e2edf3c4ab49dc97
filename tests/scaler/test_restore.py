"""A dead worker's unacked messages back at once (services.ownership + scaler.restore), on a real
Redis with entries written by real kombu and real Celery workers killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis
from scaler_support import effects, free_port, migrate, service_app, worker_env
from support.polling import poll_until

from scaler.backends.base import ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.restore import RESTORED, UnackedRestorer
from services import ownership
from services.config import PRIORITY_SEP

IO = "io_intensive"
SERVICE = ServiceSpec("io", (IO,))


@pytest.fixture
def env(redis_url: str, database_url: str, key_prefix: str) -> dict[str, str]:
    return worker_env(redis_url, database_url, f"{key_prefix}rs{uuid.uuid4().hex[:6]}:")


@pytest.fixture
def client(redis_url: str, env: dict[str, str]) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    keys = list(c.scan_iter(match=env["CELERY_KEY_PREFIX"] + "*", count=500))
    if keys:
        c.delete(*keys)
    c.close()


def _hash(client: redis.Redis, key: str) -> dict[bytes, bytes]:
    return cast(dict[bytes, bytes], client.hgetall(key))


def _lists(client: redis.Redis, prefix: str) -> dict[str, list[bytes]]:
    """Every non-empty list of the io queue (all priority sub-queues), oldest last."""
    out = {}
    for key in client.scan_iter(match=f"{prefix}{IO}*", count=500):
        items = cast(list[bytes], client.lrange(key, 0, -1))
        if items:
            out[key.decode()] = items
    return out


def _ids(lists: dict[str, list[bytes]]) -> list[str]:
    return [json.loads(m)["headers"]["id"] for items in lists.values() for m in items]


def test_owner_is_written_and_removed_with_kombus_own_entries(
    redis_url: str, client: redis.Redis, env: dict[str, str]
) -> None:
    """The tracking QoS writes exactly kombu's entries plus the owner, in one pipeline, and ack
    removes all three; a process that is no worker writes exactly what kombu writes."""
    prefix = env["CELERY_KEY_PREFIX"]
    options = {"global_keyprefix": prefix, "unacked_owner_key": "unacked_owner"}
    queue = Queue("t-own", Exchange("t-own", "direct"), "t-own")
    seen: dict[str, dict[bytes, bytes]] = {}
    for transport in (ownership.Transport, kombu_redis.Transport):
        with Connection(redis_url, transport=transport, transport_options=options) as conn:
            conn.default_channel.basic_qos(0, 1, False)
            producer = conn.Producer()
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key="t-own",
                             declare=[queue], message_id="fixed", headers={"id": "x"})  # fmt: skip
            ownership.set_node("w1@host" if transport is ownership.Transport else None)
            try:
                message = queue(conn.default_channel).get(no_ack=False)
                assert message is not None
                unacked = _hash(client, prefix + "unacked")
                owners = _hash(client, prefix + "unacked_owner")
                tag = message.delivery_tag.encode()
                assert client.zscore(prefix + "unacked_index", tag) is not None
                seen[transport.__name__ + transport.__module__] = unacked
                if transport is ownership.Transport:
                    assert owners == {tag: b"w1@host"}
                else:
                    assert owners == {}
                message.ack()
            finally:
                ownership.set_node(None)
            assert _hash(client, prefix + "unacked") == {}
            assert _hash(client, prefix + "unacked_owner") == {}
            assert client.zcard(prefix + "unacked_index") == 0
    ours, kombus = (json.loads(next(iter(v.values()))) for v in seen.values())
    ours[0]["properties"].pop("delivery_tag"), kombus[0]["properties"].pop("delivery_tag")
    assert ours == kombus  # the same entry format as kombu's own append


@pytest.fixture
def killed(
    env: dict[str, str], client: redis.Redis, database_url: str, tmp_path: Path
) -> Iterator[tuple[Any, str, dict[str, dict[bytes, Any]], list[str]]]:
    """A real worker (threads, 4) takes 4 long tasks of 4 priorities and is SIGKILLed: the app,
    its node name, a snapshot of the three kombu-written structures, and the task ids."""
    migrate(database_url)
    app = service_app(env)
    backend = LocalBackend(app=app, workdir=tmp_path / "w", env=env, concurrency=4, grace_s=5)
    backend.manage([SERVICE])
    prefix = env["CELERY_KEY_PREFIX"]
    try:
        backend.scale("io", 1)
        (worker,) = backend.workers("io")
        ids = [
            app.send_task("tasks.io_intensive.wait", kwargs={"duration": 60}, priority=p).id
            for p in (0, 3, 6, 9)
        ]
        poll_until(lambda: client.hlen(prefix + "unacked_owner") == 4, "4 tasks taken", 30)
        os.killpg(int(worker.ident), signal.SIGKILL)
        poll_until(lambda: backend.replicas("io") == 0, "the worker to die")
        snapshot = {
            "unacked": _hash(client, prefix + "unacked"),
            "unacked_owner": _hash(client, prefix + "unacked_owner"),
            "unacked_index": dict(client.zrange(prefix + "unacked_index", 0, -1, withscores=True)),
        }
        assert set(snapshot["unacked_owner"].values()) == {worker.name.encode()}
        yield app, worker.name, snapshot, ids
    finally:
        backend.stop_all(timeout_s=5)
        app.close()


def _put_back(client: redis.Redis, prefix: str, snapshot: dict[str, dict[bytes, Any]]) -> None:
    """The state right after the kill again: the three structures, and no list entry."""
    for key in list(client.scan_iter(match=f"{prefix}{IO}*", count=500)):
        client.delete(key)
    pipe = client.pipeline()
    pipe.hset(prefix + "unacked", mapping=snapshot["unacked"])
    pipe.hset(prefix + "unacked_owner", mapping=snapshot["unacked_owner"])
    pipe.zadd(prefix + "unacked_index", snapshot["unacked_index"])
    pipe.execute()


@pytest.mark.slow
def test_a_killed_workers_messages_go_back_as_kombu_restores_them(
    killed: tuple[Any, str, dict[str, dict[bytes, Any]], list[str]],
    client: redis.Redis,
    env: dict[str, str],
) -> None:
    """Same lists, same bytes as kombu's own restore_by_tag (priority sub-queue, redelivered)."""
    app, node, snapshot, ids = killed
    prefix = env["CELERY_KEY_PREFIX"]
    with app.connection_for_write() as conn:
        for tag in snapshot["unacked"]:
            conn.default_channel.qos.restore_by_tag(tag.decode())
    by_kombu = _lists(client, prefix)
    assert sorted(_ids(by_kombu)) == sorted(ids)
    # Priorities 0, 3, 6, 9 (9 most urgent) are Redis steps 9, 6, 3, 0: four sub-queues.
    expected = {prefix + IO} | {f"{prefix}{IO}{PRIORITY_SEP}{step}" for step in (3, 6, 9)}
    assert set(by_kombu) == expected
    _put_back(client, prefix, snapshot)

    restorer = UnackedRestorer.for_app(app)
    assert restorer is not None
    try:
        assert restorer.owners() == {node: 4}
        result = restorer.restore_nodes([node])
    finally:
        restorer.close()
    assert (result.restored, dict(result.by_queue), result.skipped) == (4, {IO: 4}, 0)
    assert _lists(client, prefix) == by_kombu  # byte for byte
    for items in by_kombu.values():
        message = json.loads(items[0])
        assert message["headers"]["redelivered"] is True
        assert message["properties"]["delivery_info"]["redelivered"] is True
    for key in ("unacked", "unacked_owner"):
        assert client.hlen(prefix + key) == 0
    assert client.zcard(prefix + "unacked_index") == 0


@pytest.mark.slow
def test_racing_restorers_and_kombus_sweep_restore_each_message_once(
    killed: tuple[Any, str, dict[str, dict[bytes, Any]], list[str]],
    client: redis.Redis,
    env: dict[str, str],
) -> None:
    """Two restorers of ours and kombu's restore_by_tag (the visibility-timeout sweep's step),
    all at once, 40 times over the real entries: every message on its queue exactly once."""
    app, node, snapshot, ids = killed
    prefix = env["CELERY_KEY_PREFIX"]
    ours = [UnackedRestorer.for_app(app) for _ in range(2)]
    tags = [t.decode() for t in snapshot["unacked"]]
    restored_by_us = 0
    try:
        with app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            for _ in range(40):
                _put_back(client, prefix, snapshot)
                barrier = threading.Barrier(3)
                counts: list[int] = []

                def ours_run(
                    r: UnackedRestorer, barrier: threading.Barrier, counts: list[int]
                ) -> None:
                    barrier.wait()
                    counts.append(r.restore_nodes([node]).restored)

                def kombu_run(barrier: threading.Barrier) -> None:
                    barrier.wait()
                    for tag in tags:
                        qos.restore_by_tag(tag)

                threads = [
                    threading.Thread(target=ours_run, args=(r, barrier, counts)) for r in ours if r
                ]
                threads.append(threading.Thread(target=kombu_run, args=(barrier,)))
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                assert sorted(_ids(_lists(client, prefix))) == sorted(ids)  # each once
                assert client.hlen(prefix + "unacked") == 0
                assert client.hlen(prefix + "unacked_owner") == 0
                restored_by_us += sum(counts)
    finally:
        for r in ours:
            if r is not None:
                r.close()
    assert restored_by_us > 0  # the race really was run, not always won by kombu


@pytest.mark.slow
def test_a_live_workers_messages_are_never_restored(
    env: dict[str, str], client: redis.Redis, database_url: str, tmp_path: Path
) -> None:
    """With one worker killed and one alive: restoring the dead node leaves the live one's
    messages alone, and the start sweep (nobody in the backend's live set) spares the worker
    that answers a ping. The local backend restores the dead one's before its replacement (of
    the same name) starts, and every task's effect is written once."""
    migrate(database_url)
    app = service_app(env)
    restorer = UnackedRestorer.for_app(app)
    assert restorer is not None
    backend = LocalBackend(app=app, workdir=tmp_path / "w", env=env, grace_s=10,
                           restorer=restorer)  # fmt: skip
    backend.manage([SERVICE])
    prefix = env["CELERY_KEY_PREFIX"]
    try:
        backend.scale("io", 2)
        poll_until(lambda: len(backend.workers("io")) == 2, "two workers")
        tasks = [app.send_task("tasks.io_intensive.wait", kwargs={"duration": 6}) for _ in range(2)]
        poll_until(lambda: len(set(restorer.owners())) == 2, "each worker holding one task", 30)
        dead, live = backend.workers("io")
        live_tags = restorer.owned_by(live.name)
        os.killpg(int(dead.ident), signal.SIGKILL)
        poll_until(lambda: backend.replicas("io") == 1, "the worker to die")

        swept = restorer.sweep(lambda: ((), (), ()), queues=[IO])  # engine knows nobody: ping
        assert swept.by_node.keys() <= {dead.name}
        assert restorer.owned_by(live.name) == live_tags  # untouched

        events = backend.reconcile()  # restores what is left of the dead one, then replaces it
        restored = swept.restored + sum(e.count for e in events if e.kind == RESTORED)
        assert restored == 1, events
        assert restorer.owned_by(live.name) == live_tags
        for task in tasks:
            task.get(timeout=30)
        assert effects(database_url, [t.id for t in tasks]) == {t.id: 1 for t in tasks}
        # The ack (and its owner entry's removal) follows the result the test waited for.
        poll_until(lambda: client.hlen(prefix + "unacked_owner") == 0, "the owner entries gone", 10)
    finally:
        backend.stop_all(timeout_s=10)
        restorer.close()
        app.close()


def test_an_ack_lost_with_the_connection_is_settled_not_run_again(
    tmp_path: Path, database_url: str
) -> None:
    """The nemesis campaign's Redis restarts ran finished tasks twice: a worker's ack went with
    the connection, and its give-back after the reconnect put the message back, for it no longer
    held it. A real redis-server (AOF, fsync always) is SIGKILLed under a worker's ack and
    started again from its files: the acked message is settled (its entries removed, as the ack
    would have), the one still held stays, nothing goes back to a queue."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def serve() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll_until(lambda: _answers(client), f"redis-server on {port}", 10)
        return proc

    server = serve()
    app = service_app(worker_env(url, database_url, f"ack{uuid.uuid4().hex[:6]}:"))
    prefix = app.conf.broker_transport_options["global_keyprefix"]
    node = "io_intensive@acked"
    conn = app.connection_for_write()
    try:
        for n in range(2):
            app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0, "n": n})
        queue = Queue(IO, routing_key=IO)
        ownership.set_node(node)
        try:
            done, running = (queue(conn.default_channel).get(no_ack=False) for _ in range(2))
        finally:
            ownership.set_node(None)
        assert done is not None and running is not None
        server.kill()  # SIGKILL: whatever Redis has is in its AOF (fsync always)
        server.wait(10)
        with pytest.raises(redis.ConnectionError):
            done.ack()  # the task ran; its ack goes with the connection
        assert str(done.delivery_tag) in ownership.settling()
        server = serve()
        restored = ownership.restore_after_reconnect(app, node, {str(running.delivery_tag)})
        assert restored == 0, "a task that ran was put back to run again"
        assert _hash(client, prefix + "unacked_owner") == {
            str(running.delivery_tag).encode(): node.encode()
        }
        assert set(_hash(client, prefix + "unacked")) == {str(running.delivery_tag).encode()}
        assert _lists(client, prefix) == {}, "nothing goes back to the queue"
        assert str(done.delivery_tag) not in ownership.settling()
    finally:
        conn.collect()
        app.close()
        client.close()
        server.kill()
        server.wait(10)


def test_a_message_taken_but_never_recorded_goes_back_once(
    client: redis.Redis, env: dict[str, str]
) -> None:
    """kombu's BRPOP window on a live worker: the worker holds the bytes of messages whose
    ``unacked`` write failed as the connection went. Given back, one whose write never reached
    Redis is pushed to its queue (redelivered), and one whose write did land (the reply was what
    got lost) is not pushed: the owner restore puts that one back, so each goes back once."""
    app = service_app(env)
    prefix = env["CELERY_KEY_PREFIX"]
    node = "io_intensive@window"
    conn = app.connection_for_write()
    restorer = UnackedRestorer.for_app(app)
    assert restorer is not None
    try:
        ids = [app.send_task("tasks.io_intensive.wait", kwargs={"n": n}).id for n in range(2)]
        queue = Queue(IO, routing_key=IO)
        ownership.set_node(node)
        try:
            landed, dropped = (queue(conn.default_channel).get(no_ack=False) for _ in range(2))
        finally:
            ownership.set_node(None)
        assert landed is not None and dropped is not None
        entries = {
            str(m.delivery_tag): _hash(client, prefix + "unacked")[str(m.delivery_tag).encode()]
            for m in (landed, dropped)
        }
        tag = str(dropped.delivery_tag)  # its write "never reached Redis"
        client.hdel(prefix + "unacked", tag)
        client.hdel(prefix + "unacked_owner", tag)
        client.zrem(prefix + "unacked_index", tag)
        assert _lists(client, prefix) == {}

        assert restorer.give_back_untracked(entries) == 1
        back = _lists(client, prefix)
        assert _ids(back) == [dropped.headers["id"]]
        assert json.loads(next(iter(back.values()))[0])["headers"]["redelivered"] is True
        assert restorer.restore_nodes([node]).restored == 1  # the landed one, by its owner entry
        assert sorted(_ids(_lists(client, prefix))) == sorted(ids)
        assert _hash(client, prefix + "unacked") == {}
    finally:
        restorer.close()
        conn.collect()
        app.close()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
