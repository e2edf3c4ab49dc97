"""Every task success and failure, kept in two bounded Redis lists (the latest N of each), and
the starts of the tasks that ask for them (a third list, bounded the same way).

The lists are an operator's quick view ("what failed just now?"), not the system of record: a
recording that fails is logged and the task's own outcome stands. One Redis client per process
(redis-py's pool notices a fork and reconnects), short socket timeouts so a slow Redis cannot stall
tasks, and payloads truncated so one huge result cannot blow up the lists.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

SUCCESSES = "task_successes"
FAILURES = "task_failures"
# One record per start of a task that asks for it (``record_starts=True``): who started it
# (Celery node, container hostname, pid) and when (wall time). A checker that reads them counts
# how often each id STARTED, not only its idempotent effect (tests/chaos/nemesis_check.py).
STARTS = "task_starts"


def truncate(value: Any, max_chars: int) -> Any:
    """The value itself if its JSON fits in max_chars, else a marked, cut-down JSON string."""
    text = json.dumps(value, default=repr, sort_keys=True)
    if len(text) <= max_chars:
        return value
    return {"truncated": True, "original_chars": len(text), "head": text[:max_chars]}


class TaskRecorder:
    """Appends records to ``{prefix}task_successes`` / ``{prefix}task_failures``."""

    def __init__(self, redis_url: str, key_prefix: str, limit: int, max_chars: int) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.limit = limit
        self.max_chars = max_chars
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        """The process's one client (created on first use, shared by every task)."""
        if self._client is None:
            # One quick retry at most: a task must not wait long on its own bookkeeping.
            self._client = redis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=2,
                socket_timeout=2,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 1),
            )
        return self._client

    def key(self, kind: str) -> str:
        return f"{self.key_prefix}{kind}"

    def record_success(self, task_id: str, task_name: str, result: Any) -> None:
        self._push(SUCCESSES, {"task_id": task_id, "task": task_name, "result": result})

    def record_start(
        self, task_id: str, task_name: str, node: str, retries: int, redelivered: bool
    ) -> None:
        """Before the work: one LPUSH+LTRIM round trip, bounded like the other lists."""
        self._push(
            STARTS,
            {
                "task_id": task_id,
                "task": task_name,
                "node": node,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "retries": retries,
                "redelivered": redelivered,
            },
        )

    def record_failure(
        self, task_id: str, task_name: str, error: str, args: Any, kwargs: Any
    ) -> None:
        self._push(
            FAILURES,
            {"task_id": task_id, "task": task_name, "error": error, "args": args, "kwargs": kwargs},
        )

    def latest(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind, newest first."""
        raw_records = cast(list[bytes], self.client.lrange(self.key(kind), 0, -1))
        return [json.loads(raw) for raw in raw_records]

    def _push(self, kind: str, record: dict[str, Any]) -> None:
        record = {
            name: truncate(value, self.max_chars) if name in ("result", "args", "kwargs") else value
            for name, value in record.items()
        }
        if "error" in record:
            record["error"] = str(record["error"])[: self.max_chars]
        record["timestamp"] = time.time()
        payload = json.dumps(record, default=repr)
        try:
            key = self.key(kind)
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(key, payload)
            pipe.ltrim(key, 0, self.limit - 1)
            pipe.execute()
        except Exception:
            log.exception("could not record %s of task %s", kind, record.get("task_id"))
