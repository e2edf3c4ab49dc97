"""Queue depth and in-flight count for queues on a RabbitMQ broker.

Depth is the queue's ready-message count from a passive ``queue.declare`` (it creates nothing and
costs one round trip). AMQP does not expose a queue's unacknowledged count and this deployment
does not assume the management plugin, so in-flight work is read from the workers themselves:
Celery's control API (``inspect active`` + ``inspect reserved``, one short broadcast each),
counting requests whose routing key is the queue. That is honest only when every consumer
answers: if the broker reports consumers on a queue but no worker consuming it replied in time,
in-flight is None (missing), not 0. The oldest message's age is not readable without consuming
it on RabbitMQ, so it is None; a latency target then has nothing to act on and depth rules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kombu import Connection

from scaler.observations import QueueSignal

NOT_FOUND = 404


@dataclass(frozen=True)
class QueueCounts:
    """What a passive declare says about one queue."""

    ready: int
    consumers: int


def declare_counts(connection: Connection, queue: str) -> QueueCounts:
    """Ready messages and consumers of ``queue``; a queue that does not exist yet holds none."""
    channel = connection.channel()
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
        return QueueCounts(ready=int(ok.message_count), consumers=int(ok.consumer_count))
    except Exception as exc:
        if getattr(exc, "code", None) == NOT_FOUND:  # the channel is closed by the broker
            return QueueCounts(ready=0, consumers=0)
        raise
    finally:
        with contextlib.suppress(Exception):  # already closed by a NOT_FOUND
            channel.close()


@dataclass
class CeleryInFlight:
    """Counts tasks each worker runs or holds reserved, per queue, through Celery's control API."""

    app: Any  # celery.Celery; typed loosely to keep Celery out of the signal's import graph
    timeout_s: float = 1.0

    def __call__(self, queues: Sequence[str]) -> tuple[dict[str, int], set[str]]:
        """(tasks per queue, queues at least one replying worker consumes)."""
        inspect = self.app.control.inspect(timeout=self.timeout_s)
        consumed: set[str] = set()
        for worker_queues in (inspect.active_queues() or {}).values():
            consumed.update(q.get("name", "") for q in worker_queues)
        counts = dict.fromkeys(queues, 0)
        for reply in (inspect.active() or {}, inspect.reserved() or {}):
            for requests in reply.values():
                for request in requests:
                    routing_key = (request.get("delivery_info") or {}).get("routing_key")
                    if routing_key in counts:
                        counts[routing_key] += 1
        return counts, consumed


@dataclass
class RabbitQueueReader:
    """Reads depth (passive declare) and in-flight (Celery inspect) for RabbitMQ queues."""

    url: str
    in_flight: Callable[[Sequence[str]], tuple[Mapping[str, int], set[str]]] | None = None
    clock: Callable[[], float] = time.monotonic  # stamps read_at (staleness), never ages
    connect_timeout_s: float = 2.0
    _connection: Connection | None = field(default=None, init=False, repr=False)

    def _connect(self) -> Connection:
        if self._connection is None or not self._connection.connected:
            self._connection = Connection(self.url, connect_timeout=self.connect_timeout_s)
            self._connection.ensure_connection(max_retries=1)
        return self._connection

    def close(self) -> None:
        """Drop the broker connection (a new one is made on the next read)."""
        if self._connection is not None:
            self._connection.release()
            self._connection = None

    def read(self, queues: Sequence[str]) -> dict[str, QueueSignal]:
        """Signals for ``queues``; a field that cannot be read is None, never 0."""
        now = self.clock()
        try:
            connection = self._connect()
            counts = {q: declare_counts(connection, q) for q in queues}
        except Exception:
            self.close()
            return {q: QueueSignal(q, None, None, None, read_at=now) for q in queues}
        flights: Mapping[str, int] | None = None
        consumed: set[str] = set()
        if self.in_flight is not None:
            try:
                flights, consumed = self.in_flight(queues)
            except Exception:
                flights = None
        signals: dict[str, QueueSignal] = {}
        for queue, c in counts.items():
            in_flight: int | None
            if c.consumers == 0:
                in_flight = 0  # RabbitMQ requeues unacked messages when their consumer goes
            elif flights is None or queue not in consumed:
                in_flight = None  # consumers exist but none answered: unknown, not zero
            else:
                in_flight = flights.get(queue, 0)
            signals[queue] = QueueSignal(queue, c.ready, in_flight, None, read_at=now)
        return signals
