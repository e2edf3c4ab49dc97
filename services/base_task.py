"""The base class of every task: records outcomes and keeps priorities right on retries."""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any, cast

import psycopg2
import psycopg2.pool
from celery import Task

from services import priorities

if TYPE_CHECKING:
    from services.application import ServiceApp

log = logging.getLogger(__name__)


class RecordingTask(Task):
    """Records every success and failure in the bounded Redis lists (never failing the task)."""

    abstract = True

    # A PostgreSQL outage must not turn into acked, failed tasks: the effect's transaction rolls
    # back (services.effects.apply_once), so retrying with backoff is safe and runs it once.
    autoretry_for = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.pool.PoolError)
    retry_backoff = True
    retry_backoff_max = 30
    retry_jitter = True
    max_retries = 10

    # True: every start (a redelivery or a retry too) is recorded before the work, in the bounded
    # ``task_starts`` list (services.records), so a checker can count how often an id started.
    record_starts = False

    @property
    def service(self) -> ServiceApp:
        """The app with the service's settings, database pool and recorder."""
        from services.application import ServiceApp

        if not isinstance(self.app, ServiceApp):
            raise TypeError(f"task {self.name} is bound to {self.app!r}, expected a ServiceApp")
        return self.app

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        if not self.record_starts:
            return
        request = self.request
        try:
            self.service.recorder.record_start(
                task_id,
                self.name,
                str(request.hostname or ""),
                int(request.retries or 0),
                bool((request.delivery_info or {}).get("redelivered")),
            )
        except Exception:
            log.exception("could not record start of %s", task_id)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        log.info("task %s %s succeeded", self.name, task_id)
        try:
            self.service.recorder.record_success(task_id, self.name, retval)
        except Exception:
            log.exception("could not record success of %s", task_id)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        log.error("task %s %s failed: %r", self.name, task_id, exc)
        try:
            self.service.recorder.record_failure(
                task_id, self.name, f"{type(exc).__name__}: {exc}", list(args or ()), kwargs
            )
        except Exception:
            log.exception("could not record failure of %s", task_id)

    def signature_from_request(self, *args: Any, **kwargs: Any) -> Any:
        """Resend (retry) with the application priority, not the broker's mirrored number."""
        sig = super().signature_from_request(*args, **kwargs)
        options = sig.options
        if options.get("priority") is not None:
            options["priority"] = priorities.from_broker(
                options["priority"], self.service.settings.broker_is_redis
            )
        return sig

    def context(self) -> dict[str, str]:
        """Who runs this task and from which queue: included in every result."""
        request = self.request
        delivery = request.delivery_info or {}
        return {
            "task_id": cast(str, request.id),
            "hostname": socket.gethostname(),
            "worker": str(request.hostname or ""),
            "queue": str(delivery.get("routing_key") or ""),
        }
