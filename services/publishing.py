"""What every task message gets at publish time: an enqueue timestamp and a broker priority.

Celery messages carry no enqueue time; the scaler needs the age of the oldest waiting message, so a
``before_task_publish`` handler stamps ``enqueued_at`` (Unix epoch seconds, float) on every message
from every publisher (clients, beat, retries, workers sending subtasks).

The priority mapping has to know the app's broker, which a global signal cannot tell, so it lives
in the app's AMQP class, at the one funnel every publish goes through (after routing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery.app.amqp import AMQP
from celery.signals import before_task_publish

from services import priorities

ENQUEUED_AT_HEADER = "enqueued_at"


@before_task_publish.connect
def stamp_enqueued_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Set the header the scaler reads the age of the oldest waiting message from.

    A stamp the publisher set itself is kept (a message moved between queues keeps its age), but a
    retry is a new wait: Celery copies the request's headers into it, so it is stamped afresh.
    """
    if headers is None:
        return
    if ENQUEUED_AT_HEADER not in headers or headers.get("retries"):
        headers[ENQUEUED_AT_HEADER] = time.time()


class PriorityMappingAMQP(AMQP):
    """Publishes with the broker's priority number for the application's "9 is most urgent"."""

    def _create_task_sender(self) -> Callable[..., Any]:
        send = super()._create_task_sender()
        broker_is_redis = self.app.conf.broker_url.split("://", 1)[0] in ("redis", "rediss")

        def send_task_message(producer: Any, name: str, message: Any, **kwargs: Any) -> Any:
            kwargs["priority"] = priorities.to_broker(kwargs.get("priority"), broker_is_redis)
            return send(producer, name, message, **kwargs)

        return send_task_message
