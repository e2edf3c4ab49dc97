"""The Redis queue reader against a real Redis, with messages laid out by kombu itself.

Messages are published through a real Celery app with the project's transport layout (ten priority
steps, kombu's separator, a global key prefix), so the keys read are exactly those a worker uses.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from scaler_support import own_redis_server

from scaler.signals.redis_queues import RedisQueueReader, priority_keys

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
        redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS, clock=lambda: now
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
        redis_url, key_prefix=key_prefix, sep=SEP, steps=STEPS, clock=lambda: now
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
