"""Celery's threads pool, with the flush Celery asks of a pool when its broker connection goes.

The threads pool takes every request the consumer hands it at once: with every thread busy the
rest wait in the executor's queue. On a lost connection Celery forgets its reserved requests
(``Consumer.on_close``) and calls ``pool.flush()`` so that nothing it forgot runs; prefork's pool
drops the jobs no process took, but the threads pool's flush does nothing, so the waiting
requests still run later. Meanwhile the give-back on reconnect
(:func:`services.ownership.restore_after_reconnect`) has put their messages back for any worker
to take: the task runs twice. The nemesis campaign found it (a worker's tasks run again on
another worker around Redis restarts, after their first run had finished).

:class:`TaskPool` cancels the requests no thread has started; a started one runs to its end
(a thread cannot be stopped) and the ownership ledger keeps its message. The worker selects it
under its usual name: :func:`register` points Celery's ``threads`` alias here.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

from celery import concurrency
from celery.concurrency import thread

log = logging.getLogger(__name__)

NAME = "threads"
PATH = "services.thread_pool:TaskPool"


class TaskPool(thread.TaskPool):
    """The threads pool; :meth:`flush` drops the requests no thread has started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: set[Future[Any]] = set()
        self._lock = threading.Lock()

    def on_apply(self, *args: Any, **kwargs: Any) -> thread.ApplyResult:
        result = super().on_apply(*args, **kwargs)
        future = result.f
        with self._lock:
            self._waiting.add(future)
        future.add_done_callback(self._forget)
        return result

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._waiting.discard(future)

    def flush(self) -> None:
        """Cancel every request still waiting for a thread (``Future.cancel`` refuses a started
        one): their messages go back on reconnect, and they must not also run here."""
        with self._lock:
            waiting = list(self._waiting)
        dropped = sum(1 for future in waiting if future.cancel())
        if dropped:
            log.warning(
                "dropped %d task(s) waiting for a thread on the lost broker connection: "
                "their messages go back to the queue",
                dropped,
            )


def register() -> None:
    """Make ``--pool threads`` (and ``worker_pool = "threads"``) select :class:`TaskPool`."""
    concurrency.ALIASES[NAME] = PATH
