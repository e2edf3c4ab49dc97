"""Queue depth, oldest waiting age and in-flight count for queues on a Redis broker.

kombu's Redis transport keeps one queue in several lists, one per priority step: the bare name for
step 0 and ``name + sep + str(step)`` for the others, all behind the optional ``global_keyprefix``
(kombu/transport/redis.py ``_q_for_pri``). Counting only the bare key misses every prioritised
message, so all the keys are read together, in one pipeline, so the figures are from one instant.
Messages taken by a worker but not yet acked sit in the ``unacked`` hash (for every queue at once)
and are counted as in-flight work so that a busy fleet never reads as an empty queue.

Two corrections keep that honest:

- **Not-yet-due ETA messages are not waiting.** A message whose ETA is still ahead sits in the list
  while no worker consumes the queue (a service at zero). Counting it would wake the service, its
  worker would take and hold it (an unacked ETA entry is not work), the service would go idle and
  park, the message would go back, and the cycle would repeat until the ETA. The oldest
  ``ETA_SCAN`` messages of each priority list are read and the not-due ones among them are
  subtracted from ``waiting`` (reported as ``not_due``). **Documented limit:** in a list longer
  than ``ETA_SCAN`` only that scanned, oldest part is corrected; not-due messages behind it still
  count as waiting.
- **A killed worker's unacked entries are not in flight.** kombu keeps a message in ``unacked``
  until it is acked or, after ``visibility_timeout`` (an hour by default), restored to its list. A
  worker killed outright (SIGKILL, OOM, a host lost) leaves its entries there for that long, and
  they would hold replicas up and block scale to zero. kombu's ``unacked_index`` sorted set holds
  each entry's delivery time as its score; an entry older than ``abandon_after_s`` (the app's hard
  time limit plus a margin: the longest a live worker can hold a due task; for an ETA task counted
  from max(delivery, ETA)) cannot belong to a live worker and is reported as ``abandoned`` instead
  of in flight. It stays in Redis: kombu restores it to its list at the visibility timeout, when it
  counts as waiting again. Without a bound (``None``: the app sets no hard time limit) nothing is
  excluded.

Clocks: ``read_at`` is stamped from ``clock`` (monotonic, for staleness, like the loop's ``now``);
message ages, ETAs and delivery times are compared with ``wall`` (the wall clock, the one
publishers and workers stamp with).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import redis

from scaler.observations import QueueSignal

# kombu's defaults; the application's own values are passed in (services.config.PRIORITY_*).
DEFAULT_SEP = "\x06\x16"
DEFAULT_STEPS: tuple[int, ...] = (0, 3, 6, 9)
# How many of the oldest messages per priority list are read to find ETA tasks not yet due (for
# both the oldest age and the not-due correction of ``waiting``).
ETA_SCAN = 100


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


def scan_message(raw: bytes | str, now: float) -> tuple[bool, float | None]:
    """(not due yet, waiting since) for one stored message; ``now`` is wall-clock time.

    A message whose ETA is after ``now`` is not waiting yet: (True, None). Otherwise it has been
    waiting since its ``enqueued_at`` header, or since its ETA when that is later; None when it
    carries no stamp (or cannot be read).
    """
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
    except (ValueError, AttributeError):
        return False, None
    eta = _eta_epoch(headers.get("eta"))
    if eta is not None and eta > now:
        return True, None
    stamped = headers.get("enqueued_at")
    if not isinstance(stamped, int | float):
        return False, None
    return False, max(float(stamped), eta) if eta is not None else float(stamped)


def _unacked_entry(raw: bytes | str) -> tuple[str, float | None] | None:
    """(routing key, ETA in Unix seconds or None) of one ``unacked`` hash entry, or None.

    kombu stores each entry as ``[message, exchange, routing_key]``.
    """
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)):
        return None
    message = entry[0] if isinstance(entry[0], dict) else {}
    return entry[2], _eta_epoch((message.get("headers") or {}).get("eta"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class RedisQueueReader:
    """Reads every managed queue's signals from a Redis broker in one pipeline round trip.

    ``clock`` stamps ``read_at`` (monotonic, compared with the loop's ``now`` for staleness);
    ``wall`` is the wall clock that message ages, ETAs and delivery times are measured against.
    ``abandon_after_s``: an unacked entry delivered longer ago than this (counted from its ETA
    when that is later) is a dead worker's and is reported as ``abandoned``, not in flight; None
    keeps every entry in flight (see the module docstring).
    """

    client: redis.Redis
    key_prefix: str = ""
    sep: str = DEFAULT_SEP
    steps: Sequence[int] = DEFAULT_STEPS
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    abandon_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.abandon_after_s is not None and self.abandon_after_s <= 0:
            raise ValueError(f"abandon_after_s={self.abandon_after_s!r}: expected > 0 or None")

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> RedisQueueReader:
        """A reader with short socket timeouts: a dead broker fails a cycle fast, never hangs it."""
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client=client, **kwargs)  # type: ignore[arg-type]

    def read(self, queues: Sequence[str]) -> dict[str, QueueSignal]:
        """Signals for ``queues``; every field None for all of them when Redis cannot be read."""
        read_at = self.clock()
        now = self.wall()
        layout = {q: priority_keys(q, self.sep, self.steps, self.key_prefix) for q in queues}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys in layout.values():
                    for key in keys:
                        pipe.llen(key)
                        pipe.lrange(key, -ETA_SCAN, -1)
                pipe.hgetall(self.key_prefix + "unacked")
                pipe.zrange(self.key_prefix + "unacked_index", 0, -1, withscores=True)
                replies = pipe.execute()
        except redis.RedisError:
            return {q: QueueSignal(q, None, None, None, read_at=read_at) for q in queues}
        in_flight, abandoned = self._in_flight(queues, replies[-2], replies[-1], now)
        signals: dict[str, QueueSignal] = {}
        position = 0
        for queue, keys in layout.items():
            waiting = 0
            not_due = 0
            oldest: float | None = None
            for _key in keys:
                length, tail = replies[position], replies[position + 1]
                position += 2
                waiting += int(length)
                for raw in tail:  # LPUSH + BRPOP: the right end is the oldest
                    later, since = scan_message(raw, now)
                    not_due += later
                    if since is not None and (oldest is None or since < oldest):
                        oldest = since
            age = max(0.0, now - oldest) if oldest is not None else None
            signals[queue] = QueueSignal(
                queue,
                max(0, waiting - not_due),
                in_flight[queue],
                age,
                read_at=read_at,
                abandoned=abandoned[queue],
                not_due=not_due,
            )
        return signals

    def _in_flight(
        self,
        queues: Sequence[str],
        entries: Mapping[bytes | str, bytes | str],
        index: Sequence[tuple[bytes | str, float]],
        now: float,
    ) -> tuple[dict[str, int], dict[str, int]]:
        """(in flight, abandoned) per queue from the ``unacked`` hash and its delivery index."""
        delivered = {_text(tag): float(score) for tag, score in index}
        in_flight: dict[str, int] = dict.fromkeys(queues, 0)
        abandoned: dict[str, int] = dict.fromkeys(queues, 0)
        for tag, raw in entries.items():
            parsed = _unacked_entry(raw)
            if parsed is None or parsed[0] not in in_flight:
                continue
            routing_key, eta = parsed
            if eta is not None and eta > now:
                continue  # an ETA task a worker holds until its time: not work yet
            at = delivered.get(_text(tag))
            if self.abandon_after_s is not None and at is not None:
                due_since = max(at, eta) if eta is not None else at
                if now - due_since > self.abandon_after_s:
                    abandoned[routing_key] += 1
                    continue
            in_flight[routing_key] += 1
        return in_flight, abandoned
