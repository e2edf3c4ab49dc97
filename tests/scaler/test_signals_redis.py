"""The Redis queue reader against a real Redis, with messages laid out by kombu itself.

Messages are published through a real Celery app with the project's transport layout (ten priority
steps, kombu's separator, a global key prefix), so the keys read are exactly those a worker uses.
"""

from __future__ import annotations

import os
import signal as signal_module
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from scaler_support import (
    effects,
    migrate,
    own_redis_server,
    service_app,
    worker_env,
)
from support.polling import poll_until

from scaler.backends.base import ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.observations import QueueSignal
from scaler.signals.collector import ABANDON_MARGIN_S, queue_reader_for_app
from scaler.signals.redis_queues import ETA_SCAN, RedisQueueReader, priority_keys

SEP = "\x06\x16"
STEPS = list(range(10))


def make_app(redis_url: str, key_prefix: str) -> Celery:
    app = Celery("signals-test", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {
        "global_keyprefix": key_prefix,
        "priority_steps": STEPS,
        "sep": SEP,
        "queue_order_strategy": "priority",
    }
    app.conf.task_serializer = "json"
    return app


@pytest.fixture
def queue() -> str:
    return f"sig-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app(redis_url: str, key_prefix: str) -> Iterator[Celery]:
    app = make_app(redis_url, key_prefix)
    yield app
    app.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _cleanup(client: redis.Redis, key_prefix: str, queue: str) -> Iterator[None]:
    yield
    keys = priority_keys(queue, SEP, STEPS, key_prefix)
    client.delete(*keys)
    client.delete(key_prefix + "unacked", key_prefix + "unacked_index")


def send(app: Celery, queue: str, priority: int, enqueued_at: float, **kw: object) -> None:
    app.send_task(
        "tasks.none",
        queue=queue,
        priority=priority,
        headers={"enqueued_at": enqueued_at},
        **kw,  # type: ignore[arg-type]
    )


def test_depth_counts_every_priority_subqueue_behind_the_prefix(
    app: Celery, client: redis.Redis, redis_url: str, key_prefix: str, queue: str
) -> None:
    now = time.time()
    for priority in STEPS:
        send(app, queue, priority, now)
        send(app, queue, priority, now)
    used = [k for k in priority_keys(queue, SEP, STEPS, key_prefix) if client.llen(k)]
    assert len(used) == len(STEPS), "kombu spread the messages over one list per step"

    reader = RedisQueueReader.from_url(redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS)
    signal = reader.read([queue])[queue]
    assert signal.waiting == 2 * len(STEPS)
    assert signal.in_flight == 0

    # Reading only the bare key (kombu's default steps, no prefix) would miss them: the reason
    # the layout is passed in from the app's own settings.
    naive = RedisQueueReader.from_url(redis_url).read([queue])[queue]
    assert naive.waiting == 0


def test_oldest_age_is_the_oldest_enqueued_at_across_subqueues(
    app: Celery, redis_url: str, key_prefix: str, queue: str
) -> None:
    now = time.time()
    send(app, queue, 0, now - 5)
    send(app, queue, 9, now - 30)  # the oldest sits in another sub-queue
    send(app, queue, 4, now - 1)
    reader = RedisQueueReader.from_url(
        redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS, wall=lambda: now
    )
    signal = reader.read([queue])[queue]
    assert signal.waiting == 3
    assert signal.oldest_age_s == pytest.approx(30.0)


def test_eta_in_the_future_is_not_waiting(
    app: Celery, redis_url: str, key_prefix: str, queue: str
) -> None:
    now = time.time()
    send(app, queue, 0, now - 100, countdown=3600)
    reader = RedisQueueReader.from_url(
        redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS, wall=lambda: now
    )
    assert reader.read([queue])[queue].oldest_age_s is None
    send(app, queue, 0, now - 7)
    assert reader.read([queue])[queue].oldest_age_s == pytest.approx(7.0)


def test_unacked_messages_count_as_in_flight_for_their_queue_only(
    app: Celery, redis_url: str, key_prefix: str, queue: str
) -> None:
    other = f"{queue}-other"
    now = time.time()
    for _ in range(3):
        send(app, queue, 5, now)
    send(app, other, 5, now)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        taken = [channel.basic_get(queue, no_ack=False) for _ in range(2)]
        assert all(m is not None for m in taken)
        reader = RedisQueueReader.from_url(redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS)
        signals = reader.read([queue, other])
        assert signals[queue].waiting == 1
        assert signals[queue].in_flight == 2
        assert signals[queue].work == 3
        assert signals[other].in_flight == 0
        for message in taken:
            message.ack()
        assert reader.read([queue])[queue].in_flight == 0
    redis.Redis.from_url(redis_url).delete(*priority_keys(other, SEP, STEPS, key_prefix))


def test_unreachable_redis_reads_as_missing_never_zero(queue: str) -> None:
    with own_redis_server() as (url, proc):
        reader = RedisQueueReader.from_url(url)
        before = reader.read([queue])[queue]
        assert (before.waiting, before.in_flight) == (0, 0)  # reachable and empty: a real zero
        proc.kill()
        proc.wait(10)
        after = reader.read([queue])[queue]
    assert after.waiting is None
    assert after.in_flight is None
    assert after.oldest_age_s is None
    assert after.work is None


# -- ETA messages that are not due yet are not waiting ------------------------------------------


def test_not_yet_due_eta_messages_are_not_waiting_and_age_from_their_eta_once_due(
    app: Celery, client: redis.Redis, redis_url: str, key_prefix: str, queue: str
) -> None:
    now = time.time()
    for _ in range(3):
        send(app, queue, 0, now - 100, countdown=30)
    send(app, queue, 5, now - 4)  # due: a plain message, in another priority list
    wall = [now]
    reader = RedisQueueReader.from_url(
        redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS, wall=lambda: wall[0]
    )
    before = reader.read([queue])[queue]
    assert (before.waiting, before.not_due, before.work) == (1, 3, 1)
    assert before.oldest_age_s == pytest.approx(4.0)

    # The reader's wall clock is the test's to move: 40 s later the ETAs (now + 30) are due, and
    # their age counts from the ETA, not from when they were published (now - 100).
    client.delete(f"{key_prefix}{queue}{SEP}5")
    wall[0] = now + 40
    after = reader.read([queue])[queue]
    assert (after.waiting, after.not_due) == (3, 0)
    assert after.oldest_age_s == pytest.approx(10.0, abs=1.0)


def test_only_the_scanned_oldest_part_of_a_long_list_is_corrected(
    app: Celery, redis_url: str, key_prefix: str, queue: str
) -> None:
    """The documented limit: a list longer than ETA_SCAN is corrected for its oldest part only."""
    now = time.time()
    for _ in range(ETA_SCAN + 5):
        send(app, queue, 0, now, countdown=3600)
    reader = RedisQueueReader.from_url(redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS)
    signal = reader.read([queue])[queue]
    assert (signal.waiting, signal.not_due) == (5, ETA_SCAN)


# -- a killed worker's unacked entries are not in flight ----------------------------------------


def test_an_unacked_entry_past_the_bound_is_abandoned_an_eta_one_counted_from_its_eta(
    app: Celery, redis_url: str, key_prefix: str, queue: str
) -> None:
    now = time.time()
    send(app, queue, 5, now)
    send(app, queue, 5, now, countdown=100)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        # kombu itself files both in `unacked`, with the delivery time in `unacked_index`.
        taken = [channel.basic_get(queue, no_ack=False) for _ in range(2)]
        assert all(m is not None for m in taken)
        delivered = time.time()
        wall = [delivered]
        reader = RedisQueueReader.from_url(
            redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS, wall=lambda: wall[0],
            abandon_after_s=30.0,
        )  # fmt: skip

        def flight() -> tuple[int | None, int]:
            signal = reader.read([queue])[queue]
            return signal.in_flight, signal.abandoned

        assert flight() == (1, 0)  # the plain one; the ETA one is held, not work yet
        wall[0] = delivered + 31
        assert flight() == (0, 1)  # the plain one outlived the bound; the ETA one is not due
        wall[0] = now + 100 + 29
        assert flight() == (1, 1)  # the ETA one is due, within the bound counted from its ETA
        wall[0] = now + 100 + 31
        assert flight() == (0, 2)
        for message in taken:
            message.ack()
        assert flight() == (0, 0)


SERVICE = ServiceSpec("io", ("io_intensive",))


@pytest.mark.slow
def test_a_killed_workers_task_stops_counting_in_flight_after_the_bound_a_live_ones_counts(
    redis_url: str, database_url: str, key_prefix: str, tmp_path: Path
) -> None:
    migrate(database_url)
    # The bound is the app's hard time limit plus a margin, so it scales with task_time_limit: a
    # short one here keeps the wait at seconds (the shipped limit would make it minutes; the next
    # test checks that the factory reads the app's real conf).
    env = {
        **worker_env(redis_url, database_url, f"{key_prefix}ph{uuid.uuid4().hex[:6]}:"),
        "CELERY_TASK_TIME_LIMIT": "8",
        "CELERY_TASK_SOFT_TIME_LIMIT": "7",
    }
    app = service_app(env)
    reader = queue_reader_for_app(app, abandon_margin_s=2.0)
    assert isinstance(reader, RedisQueueReader) and reader.abandon_after_s == 10.0
    backend = LocalBackend(app=app, workdir=tmp_path / "workers", env=env, grace_s=10.0)
    backend.manage([SERVICE])
    unacked = env["CELERY_KEY_PREFIX"] + "unacked"

    def signal() -> QueueSignal:
        return reader.read(["io_intensive"])["io_intensive"]

    try:
        backend.scale("io", 1)
        (victim,) = backend.workers("io")
        app.send_task("tasks.io_intensive.wait", kwargs={"duration": 30.0})
        poll_until(lambda: signal().in_flight == 1, "the worker to take the task", 30)
        os.killpg(int(victim.ident), signal_module.SIGKILL)  # the worker and its pool child
        poll_until(lambda: backend.replicas("io") == 0, "the worker to die")
        right_after = signal()
        assert (right_after.in_flight, right_after.abandoned) == (1, 0)  # could be a live one's

        gone = poll_until(
            lambda: (s := signal()).abandoned == 1 and s, "the entry to pass its bound", 30
        )
        assert gone.in_flight == 0 and gone.work == 0
        assert reader.client.hlen(unacked) == 1  # still there for kombu to restore: not lost

        # A live worker's running task counts, the dead one's bound long passed.
        backend.scale("io", 1)
        live = app.send_task("tasks.io_intensive.wait", kwargs={"duration": 5.0})
        poll_until(lambda: signal().in_flight == 1, "the live worker to take its task", 30)
        assert signal().abandoned == 1
        live.get(timeout=30)
        assert effects(database_url, [live.id]) == {live.id: 1}
    finally:
        backend.stop_all(timeout_s=10.0)
        reader.client.delete(unacked, unacked + "_index")
        app.close()


def test_the_factory_takes_the_bound_from_the_apps_own_hard_time_limit(
    redis_url: str, database_url: str, key_prefix: str
) -> None:
    env = worker_env(redis_url, database_url, key_prefix)
    env.pop("CELERY_TASK_TIME_LIMIT", None)
    env.pop("CELERY_TASK_SOFT_TIME_LIMIT", None)
    app = service_app(env)  # the project's app with its shipped settings
    try:
        assert app.conf.task_time_limit == 300  # services.config's default
        reader = queue_reader_for_app(app)
        assert isinstance(reader, RedisQueueReader)
        assert reader.abandon_after_s == 300 + ABANDON_MARGIN_S
        # An app with no hard time limit has no bound: no entry is ever taken for a dead one's.
        plain = make_app(redis_url, key_prefix)
        unbounded = queue_reader_for_app(plain)
        assert isinstance(unbounded, RedisQueueReader) and unbounded.abandon_after_s is None
        plain.close()
    finally:
        app.close()
