"""The beat schedule: the seed's three periodic tasks.

Queues are not named here: the router sends tasks.cleanup.* and tasks.reports.* to ``scheduled``
and tasks.monitoring.* to ``priority``, so routing has one source of truth. Priorities use the
application's meaning (9 is the most urgent on both brokers).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab

from services.priorities import MOST_URGENT

CLEANUP_TASK = "tasks.cleanup.cleanup_expired_sessions"
REPORTS_TASK = "tasks.reports.generate_daily_reports"
HEALTH_TASK = "tasks.monitoring.health_check"


def beat_schedule(health_check_interval: float = 300.0) -> dict[str, dict[str, Any]]:
    """The schedule; the health check's period comes from HEALTH_CHECK_INTERVAL (seconds)."""
    return {
        "cleanup-expired-sessions": {
            "task": CLEANUP_TASK,
            "schedule": timedelta(hours=1),
            # A run that has not started within the hour is superseded by the next one.
            "options": {"expires": 3600},
        },
        "generate-daily-reports": {
            "task": REPORTS_TASK,
            "schedule": crontab(hour=2, minute=0),
        },
        "health-check": {
            "task": HEALTH_TASK,
            "schedule": timedelta(seconds=health_check_interval),
            # A check older than one period says nothing the next one will not say better.
            "options": {"priority": MOST_URGENT, "expires": health_check_interval},
        },
    }
