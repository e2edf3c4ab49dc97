"""Run N tasks with unique ids and prove each was done exactly once.

The proof reads the two places a task can be: PostgreSQL's ``task_effects`` (one row per task id
whose effect committed) and the broker (messages still waiting or held unacked). After a scenario
every id must have its row, no id more than one, and nothing left on the broker. Redeliveries that
the idempotent effect absorbed are counted from the success records (``"duplicate": true``).

The readers are small protocols so the stack-level scenarios (tests/chaos/test_stack_*.py) can
plug in readers that reach the stack's PostgreSQL and broker (for example through
``docker exec``) and reuse the same burst and verdict.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import psycopg2
import redis
from kombu import Connection

from services.config import PRIORITY_SEP, PRIORITY_STEPS


class EffectReader(Protocol):
    """How many effect rows each task id has (ids without a row are absent)."""

    def counts(self, task_ids: list[str]) -> dict[str, int]: ...


class BrokerReader(Protocol):
    """What the broker still holds for the given queues."""

    def waiting(self, queues: list[str]) -> int: ...

    def unacked(self) -> int | None:
        """Messages delivered but not acknowledged, or None where the broker cannot tell."""
        ...


class PostgresEffects:
    """Reads ``task_effects`` over a database URL."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def _rows(self, sql: str, task_ids: list[str]) -> list[tuple[Any, Any]]:
        conn = psycopg2.connect(self.database_url, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, (task_ids,))
                return list(cur.fetchall())
        finally:
            conn.close()

    def counts(self, task_ids: list[str]) -> dict[str, int]:
        sql = "SELECT task_id, count(*) FROM task_effects WHERE task_id = ANY(%s) GROUP BY task_id"
        return {task_id: int(n) for task_id, n in self._rows(sql, task_ids)}

    def done_at(self, task_ids: list[str]) -> dict[str, float]:
        """When each id's effect was written (Unix seconds, PostgreSQL's clock), ids done only."""
        sql = (
            "SELECT task_id, extract(epoch FROM created_at) FROM task_effects"
            " WHERE task_id = ANY(%s)"
        )
        return {task_id: float(at) for task_id, at in self._rows(sql, task_ids)}


class RedisBroker:
    """kombu's Redis layout: a list per priority step per queue, and one unacked hash."""

    def __init__(self, url: str, key_prefix: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self.key_prefix = key_prefix

    def keys(self, queue: str) -> list[str]:
        base = f"{self.key_prefix}{queue}"
        return [base] + [f"{base}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS if step]

    def waiting(self, queues: list[str]) -> int:
        lengths = [cast(int, self.client.llen(key)) for q in queues for key in self.keys(q)]
        return sum(lengths)

    def unacked(self) -> int:
        return cast(int, self.client.hlen(f"{self.key_prefix}unacked"))

    def close(self) -> None:
        self.client.close()


class AmqpBroker:
    """RabbitMQ queue depths (ready messages) through a passive declare.

    Unacknowledged messages are not visible over AMQP; once no consumer is connected RabbitMQ has
    returned them to ready, so ``waiting`` after the workers stopped covers them.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def waiting(self, queues: list[str]) -> int:
        total = 0
        with Connection(self.url) as conn:
            channel = conn.channel()
            for queue in queues:
                try:
                    total += int(channel.queue_declare(queue, passive=True).message_count)
                except conn.channel_errors:  # not declared: holds nothing
                    channel = conn.channel()
        return total

    def unacked(self) -> None:
        return None


def unique_ids(scenario: str, n: int) -> list[str]:
    """N task ids that no other run or scenario shares, in send order."""
    run = uuid.uuid4().hex[:8]
    return [f"{scenario}-{run}-{i:04d}" for i in range(n)]


def send_burst(
    app: Any,
    task_name: str,
    task_ids: list[str],
    kwargs_for: Callable[[str], dict[str, Any]],
    **options: Any,
) -> None:
    """Publish one task per id (the id is the Celery task id); options go to send_task."""
    for task_id in task_ids:
        app.send_task(task_name, kwargs=kwargs_for(task_id), task_id=task_id, **options)


def wait_all_done(
    effects: EffectReader, task_ids: list[str], timeout: float, interval: float = 0.2
) -> float:
    """Poll until every id has its effect; the wall-clock time it was seen (time.time())."""
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = len(effects.counts(task_ids))
        if done == len(task_ids):
            return time.time()
        time.sleep(interval)
    raise AssertionError(f"{done} of {len(task_ids)} tasks done after {timeout}s")


def absorbed_redeliveries(records_url: str, key_prefix: str, task_ids: Iterable[str]) -> int:
    """Runs of these ids that found the effect already there (a redelivery made harmless)."""
    wanted = set(task_ids)
    client = redis.Redis.from_url(records_url)
    try:
        raw = cast(list[bytes], client.lrange(f"{key_prefix}task_successes", 0, -1))
    finally:
        client.close()
    count = 0
    for item in raw:
        record = json.loads(item)
        result = record.get("result")
        if record.get("task_id") in wanted and isinstance(result, dict):
            count += bool(result.get("duplicate"))
    return count


def starts_per_task(records_url: str, key_prefix: str, task_ids: Iterable[str]) -> dict[str, int]:
    """How many times each of these ids started (``task_starts``: tasks with ``record_starts``,
    recorded before the work): more than 1 is a task run twice, whatever its effect absorbed."""
    counts = dict.fromkeys(task_ids, 0)
    client = redis.Redis.from_url(records_url)
    try:
        raw = cast(list[bytes], client.lrange(f"{key_prefix}task_starts", 0, -1))
    finally:
        client.close()
    for item in raw:
        task_id = json.loads(item).get("task_id")
        if task_id in counts:
            counts[task_id] += 1
    return counts


def runs_per_task(records_url: str, key_prefix: str, task_ids: Iterable[str]) -> dict[str, int]:
    """How many times each of these ids ran to success (a redelivery that found its effect
    already written counts too): exactly 1 each means no task was run twice."""
    wanted = set(task_ids)
    client = redis.Redis.from_url(records_url)
    try:
        raw = cast(list[bytes], client.lrange(f"{key_prefix}task_successes", 0, -1))
    finally:
        client.close()
    runs = dict.fromkeys(wanted, 0)
    for item in raw:
        task_id = json.loads(item).get("task_id")
        if task_id in wanted:
            runs[task_id] += 1
    return runs


@dataclass(frozen=True)
class Verdict:
    """What happened to one burst."""

    sent: int
    done: int
    lost: list[str]
    duplicated: list[str]
    waiting: int
    unacked: int | None

    def assert_exactly_once(self) -> None:
        problems = []
        if self.lost:
            problems.append(f"{len(self.lost)} lost (no effect), e.g. {self.lost[:3]}")
        if self.duplicated:
            problems.append(f"{len(self.duplicated)} with several effects: {self.duplicated[:3]}")
        if self.waiting:
            problems.append(f"{self.waiting} messages still waiting on the broker")
        if self.unacked:
            problems.append(f"{self.unacked} messages stranded unacked on the broker")
        assert not problems, f"{self.done}/{self.sent} done; " + "; ".join(problems)


def verdict(
    effects: EffectReader, broker: BrokerReader, task_ids: list[str], queues: list[str]
) -> Verdict:
    """Read both sides once; call after the scenario settled."""
    counts = effects.counts(task_ids)
    return Verdict(
        sent=len(task_ids),
        done=len(counts),
        lost=[t for t in task_ids if t not in counts],
        duplicated=[t for t, n in counts.items() if n > 1],
        waiting=broker.waiting(queues),
        unacked=broker.unacked(),
    )
