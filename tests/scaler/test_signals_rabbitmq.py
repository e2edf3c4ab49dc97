"""The RabbitMQ queue reader against a real RabbitMQ (queues unique to each test, deleted after)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue
from scaler_support import free_port

from scaler.signals.rabbitmq_queues import CeleryInFlight, RabbitQueueReader


@pytest.fixture
def queue(amqp_url: str) -> Iterator[Queue]:
    name = f"sig-{uuid.uuid4().hex[:8]}"
    q = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
    with Connection(amqp_url) as conn:
        q(conn.default_channel).declare()
    yield q
    with Connection(amqp_url) as conn:
        q(conn.default_channel).delete()


def publish(amqp_url: str, q: Queue, count: int) -> None:
    # Publisher confirms: each publish returns once the broker has queued the message, so a depth
    # read right after sees all of them (without them a read could race the last publishes).
    with Connection(amqp_url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel)
        for i in range(count):
            producer.publish({"i": i}, exchange=q.exchange, routing_key=q.routing_key)


def test_depth_is_the_ready_count_and_no_consumer_means_nothing_in_flight(
    amqp_url: str, queue: Queue
) -> None:
    publish(amqp_url, queue, 4)
    reader = RabbitQueueReader(amqp_url)
    try:
        signal = reader.read([queue.name])[queue.name]
    finally:
        reader.close()
    assert signal.waiting == 4
    # No consumer: RabbitMQ holds no unacked message for this queue, so 0 is known, not guessed.
    assert signal.in_flight == 0
    assert signal.oldest_age_s is None  # not readable on RabbitMQ without consuming


def test_a_queue_not_declared_yet_holds_nothing(amqp_url: str) -> None:
    name = f"sig-missing-{uuid.uuid4().hex[:8]}"
    reader = RabbitQueueReader(amqp_url)
    try:
        signals = reader.read([name, name + "-2"])
    finally:
        reader.close()
    assert signals[name].waiting == 0
    assert signals[name + "-2"].waiting == 0


def test_unacked_work_no_worker_reports_is_missing_not_zero(amqp_url: str, queue: Queue) -> None:
    publish(amqp_url, queue, 3)
    app = Celery("rabbit-signals", broker=amqp_url, set_as_current=False)
    reader = RabbitQueueReader(amqp_url, in_flight=CeleryInFlight(app, timeout_s=0.5))
    try:
        with Connection(amqp_url) as conn:
            channel = conn.channel()
            channel.basic_qos(0, 1, False)
            held = []
            consumer = queue(channel)
            consumer.consume(callback=lambda m: held.append(m), no_ack=False)
            conn.drain_events(timeout=5)
            assert len(held) == 1  # a consumer holds one message unacked
            signal = reader.read([queue.name])[queue.name]
            assert signal.waiting == 2
            # A consumer exists but it is not a Celery worker that could say what it holds.
            assert signal.in_flight is None
            assert signal.work is None
            channel.basic_ack(held[0].delivery_tag)
            channel.close()
    finally:
        reader.close()
        app.close()


def test_unreachable_broker_reads_as_missing() -> None:
    reader = RabbitQueueReader(f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    signal = reader.read(["anything"])["anything"]
    assert (signal.waiting, signal.in_flight) == (None, None)
