"""Queue depth, oldest waiting age and in-flight count for queues on a Redis broker.

kombu's Redis transport keeps one queue in several lists, one per priority step: the bare name for
step 0 and ``name + sep + str(step)`` for the others, all behind the optional ``global_keyprefix``
(kombu/transport/redis.py ``_q_for_pri``). Counting only the bare key misses every prioritised
message, so all the keys are read together, in one pipeline, so the figures are from one instant.
Messages taken by a worker but not yet acked sit in the ``unacked`` hash (for every queue at once)
and are counted as in-flight work so that a busy fleet never reads as an empty queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import redis

from scaler.observations import QueueSignal

# kombu's defaults; the application's own values are passed in (services.config.PRIORITY_*).
DEFAULT_SEP = "\x06\x16"
DEFAULT_STEPS: tuple[int, ...] = (0, 3, 6, 9)
# How many of the oldest messages per sub-queue are looked at to skip ETA tasks not yet due.
OLDEST_SCAN = 10


def priority_keys(queue: str, sep: str, steps: Sequence[int], prefix: str = "") -> list[str]:
    """Every Redis list kombu may hold ``queue``'s messages in, with the global key prefix."""
    keys = [prefix + queue]
    for step in steps:
        if step:
            key = f"{prefix}{queue}{sep}{step}"
            if key not in keys:
                keys.append(key)
    return keys


def _eta_epoch(eta: object) -> float | None:
    """A Celery ``eta`` header (ISO 8601) as Unix seconds; None when absent or unreadable."""
    if not isinstance(eta, str):
        return None
    try:
        return datetime.fromisoformat(eta).timestamp()
    except ValueError:
        return None


def waiting_since(raw: bytes | str, now: float) -> float | None:
    """When a stored message started waiting (its ``enqueued_at`` header), or None.

    A message whose ETA is still in the future is not waiting yet, so it is skipped (None); once
    due, it has been waiting since its ETA or its enqueue time, whichever is later.
    """
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
    except (ValueError, AttributeError):
        return None
    eta = _eta_epoch(headers.get("eta"))
    if eta is not None and eta > now:
        return None
    stamped = headers.get("enqueued_at")
    if not isinstance(stamped, int | float):
        return None
    return max(float(stamped), eta) if eta is not None else float(stamped)


def unacked_queue(raw: bytes | str, now: float) -> str | None:
    """The routing key of one ``unacked`` hash entry (kombu stores ``[message, exchange, rk]``).

    None for an entry that is not work yet: an ETA task a worker holds until its time comes.
    """
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)):
        return None
    message = entry[0] if isinstance(entry[0], dict) else {}
    eta = _eta_epoch((message.get("headers") or {}).get("eta"))
    if eta is not None and eta > now:
        return None
    return entry[2]


@dataclass
class RedisQueueReader:
    """Reads every managed queue's signals from a Redis broker in one pipeline round trip."""

    client: redis.Redis
    key_prefix: str = ""
    sep: str = DEFAULT_SEP
    steps: Sequence[int] = DEFAULT_STEPS
    clock: Callable[[], float] = time.time

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> RedisQueueReader:
        """A reader with short socket timeouts: a dead broker fails a cycle fast, never hangs it."""
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client=client, **kwargs)  # type: ignore[arg-type]

    def read(self, queues: Sequence[str]) -> dict[str, QueueSignal]:
        """Signals for ``queues``; every field None for all of them when Redis cannot be read."""
        now = self.clock()
        layout = {q: priority_keys(q, self.sep, self.steps, self.key_prefix) for q in queues}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys in layout.values():
                    for key in keys:
                        pipe.llen(key)
                        pipe.lrange(key, -OLDEST_SCAN, -1)
                pipe.hvals(self.key_prefix + "unacked")
                replies = pipe.execute()
        except redis.RedisError:
            return {q: QueueSignal(q, None, None, None, read_at=now) for q in queues}
        in_flight: dict[str, int] = dict.fromkeys(queues, 0)
        for raw in replies[-1]:
            routing_key = unacked_queue(raw, now)
            if routing_key in in_flight:
                in_flight[routing_key] += 1
        signals: dict[str, QueueSignal] = {}
        position = 0
        for queue, keys in layout.items():
            waiting = 0
            oldest: float | None = None
            for _key in keys:
                length, tail = replies[position], replies[position + 1]
                position += 2
                waiting += int(length)
                for raw in tail:  # LPUSH + BRPOP: the right end is the oldest
                    since = waiting_since(raw, now)
                    if since is not None and (oldest is None or since < oldest):
                        oldest = since
            age = max(0.0, now - oldest) if oldest is not None else None
            signals[queue] = QueueSignal(queue, waiting, in_flight[queue], age, read_at=now)
        return signals
