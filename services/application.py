"""Builds the Celery application from validated settings.

Every reliability setting below is explained in docs/celery-settings.md. ``create_app`` is a
factory so tests (and tools such as the load generator) can build a client app for a given
environment; worker and beat processes use ``services.celery_app.app``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Exchange, Queue

import services.resource_report  # noqa: F401  (registers the resource_usage control command)
from services.base_task import RecordingTask
from services.config import PRIORITY_SEP, PRIORITY_STEPS, QUEUE_NAMES, Settings
from services.db import DatabasePool
from services.heartbeat import HeartbeatFile
from services.ownership import OWNER_KEY, TRANSPORT, RestoreOnReconnect
from services.records import TaskRecorder
from services.schedule import beat_schedule
from services.thread_pool import register as register_thread_pool
from services.warm_start import WarmStart

TASK_MODULES = [
    "services.tasks.default",
    "services.tasks.cpu_intensive",
    "services.tasks.io_intensive",
    "services.tasks.priority",
    "services.tasks.scheduled",
    "services.tasks.cleanup",
    "services.tasks.reports",
    "services.tasks.monitoring",
]

# Task-name pattern -> queue (before the queue prefix). Everything else goes to "default".
ROUTES: dict[str, str] = {
    "tasks.cpu_intensive.*": "cpu_intensive",
    "tasks.io_intensive.*": "io_intensive",
    "tasks.priority.*": "priority",
    "tasks.scheduled.*": "scheduled",
    "tasks.cleanup.*": "scheduled",
    "tasks.reports.*": "scheduled",
    "tasks.monitoring.*": "priority",
}

# RabbitMQ x-max-priority: priorities 0..9 need 9; 10 as in the seed, so a queue declared by an
# earlier deployment with the seed's arguments is not redeclared differently (PRECONDITION_FAILED).
MAX_PRIORITY = 10


class ServiceApp(Celery):
    """A Celery app that carries the service's settings, database pool and outcome recorder."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.db = DatabasePool(
            settings.database_url,
            settings.db_pool_min,
            settings.db_pool_max,
            settings.db_connect_timeout,
        )
        self.recorder = TaskRecorder(
            settings.records_redis_url,
            settings.key_prefix,
            settings.records_limit,
            settings.record_max_chars,
        )


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options: the Redis priority layout, visibility timeout and key prefix."""
    options: dict[str, Any] = {
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
        "visibility_timeout": settings.visibility_timeout,
        # Look for messages abandoned by a killed worker every 10 s (kombu's default scans about
        # every 100 s), so recovery takes about the visibility timeout, not that plus 100 s.
        "unacked_restore_throttle": 1,
    }
    if settings.key_prefix:
        options["global_keyprefix"] = settings.key_prefix
    if settings.broker_is_redis:
        # Who holds each unacked message (services.ownership): the scaler restores a dead
        # worker's messages at once instead of after the visibility timeout.
        options["unacked_owner_key"] = OWNER_KEY
    return options


def task_queues(settings: Settings) -> tuple[Queue, ...]:
    return tuple(
        Queue(
            settings.queue(name),
            Exchange(settings.queue(name), type="direct"),
            routing_key=settings.queue(name),
            queue_arguments={"x-max-priority": MAX_PRIORITY},
        )
        for name in QUEUE_NAMES
    )


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    return {pattern: {"queue": settings.queue(queue)} for pattern, queue in ROUTES.items()}


def create_app(settings: Settings, main: str = "services") -> ServiceApp:
    """The configured app; tasks are registered from TASK_MODULES."""
    # `--pool threads` drops, on a lost broker connection, the requests no thread has started
    # (services.thread_pool): Celery's own threads pool runs them later, after their messages
    # went back to the queue.
    register_thread_pool()
    app = ServiceApp(
        settings,
        main=main,
        amqp="services.publishing:PriorityMappingAMQP",
        task_cls=RecordingTask,
        include=TASK_MODULES,
    )
    app.conf.update(
        broker_url=settings.broker_url,
        # On Redis, kombu's transport plus the owner of each unacked message (services.ownership).
        broker_transport=TRANSPORT if settings.broker_is_redis else None,
        result_backend=settings.result_backend,
        broker_transport_options=broker_transport_options(settings),
        result_backend_transport_options=(
            {"global_keyprefix": settings.key_prefix} if settings.key_prefix else {}
        ),
        # JSON only, in and out: pickle executes code on load.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        result_expires=settings.result_expires,
        result_extended=True,
        result_backend_always_retry=True,
        result_backend_max_retries=10,
        # Routing: the five queues, tasks routed by name.
        task_queues=task_queues(settings),
        task_routes=task_routes(settings),
        task_default_queue=settings.queue("default"),
        task_default_exchange=settings.queue("default"),
        task_default_routing_key=settings.queue("default"),
        task_queue_max_priority=MAX_PRIORITY,
        # No task loss: ack after the work, requeue when the pool child dies, hold only one.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_track_started=True,
        worker_max_tasks_per_child=settings.max_tasks_per_child,
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=100,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout,
        worker_enable_soft_shutdown_on_idle=settings.soft_shutdown_timeout > 0,
        # Monitoring: task events for Flower and the scaler.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_log_color=False,
        beat_schedule=beat_schedule(settings.health_check_interval),
        # Write beat's schedule file after every send (the default is every 180 s): a beat killed
        # and restarted would otherwise send again what it had already sent.
        beat_sync_every=1,
    )
    app.steps["consumer"].add(HeartbeatFile)
    app.steps["consumer"].add(RestoreOnReconnect)
    app.steps["consumer"].add(WarmStart)  # WORKER_WARM_START=1: boot for the warm pool
    logging.getLogger("services").setLevel(settings.log_level)

    # Weak references would let these closures be collected at once; the app lives as long.
    worker_process_init.connect(lambda **_: app.db.open(), weak=False)
    worker_process_shutdown.connect(lambda **_: app.db.close(), weak=False)
    return app
