"""A worker started for the scaler's warm pool boots fully but consumes nothing.

The scaler keeps booted replicas aside (the warm pool, docs/scaler-policy.md) so that a scale-up
is an ``add_consumer`` (milliseconds) instead of a container start plus a Celery boot (over a
second). Such a replica must never take a task while it waits: a worker started with
``-Q queue`` would consume from its first loop iteration until the scaler cancelled it. So a
worker whose environment sets ``WORKER_WARM_START=1`` (the scaler sets it on the replicas it
starts for the pool) cancels its task queues in this consumer bootstep, after the task consumer
is built and before the event loop's first ``consume()``: it answers the control API (ping,
``add_consumer``), writes its heartbeat, and takes nothing until the scaler promotes it.

Only at the first consumer start of the process: a promoted worker whose broker connection drops
consumes again after the reconnect (``add_consumer`` put its queue back in the selection).

Self-contained (Celery only): test images without the rest of ``services`` use it as it is.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

WARM_ENV = "WORKER_WARM_START"


def warm_requested(env: Any = None) -> bool:
    """True when the environment asks for a warm (non-consuming) start."""
    value = (os.environ if env is None else env).get(WARM_ENV, "")
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class WarmStart(bootsteps.StartStopStep):
    """Cancels every task queue before consuming starts, once, when WORKER_WARM_START is set."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.done = False

    def include_if(self, parent: Any) -> bool:
        return warm_requested()

    def start(self, parent: Any) -> None:
        if self.done:
            return
        self.done = True
        queues = list(parent.app.amqp.queues.consume_from)
        for queue in queues:
            parent.cancel_task_queue(queue)
        log.info(
            "warm start: consuming nothing (queues %s) until the scaler adds a consumer", queues
        )
