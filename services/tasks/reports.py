"""The daily report (02:00 UTC from beat): the previous day's task outcomes, aggregated."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from celery import shared_task
from psycopg2.extras import Json

from services.base_task import RecordingTask
from services.effects import Cursor, apply_once


def report_day(day: str | None) -> date:
    """The day to report: the given ISO date, or yesterday (UTC) since the job runs after it."""
    if day is None:
        return datetime.now(UTC).date() - timedelta(days=1)
    try:
        return date.fromisoformat(day)
    except (TypeError, ValueError):
        raise ValueError(f"day={day!r}: expected an ISO date YYYY-MM-DD or null") from None


def aggregate(cur: Cursor, day: date, task_id: str) -> dict[str, Any]:
    """Count the day's effects by task and by queue, replacing any earlier report of that day."""
    window = "created_at >= %s::date AND created_at < %s::date + 1"
    cur.execute(
        f"SELECT task_name, count(*) FROM task_effects WHERE {window} GROUP BY 1 ORDER BY 1",
        (day, day),
    )
    by_task = {name: count for name, count in cur.fetchall()}
    cur.execute(
        f"SELECT queue, count(*) FROM task_effects WHERE {window} GROUP BY 1 ORDER BY 1",
        (day, day),
    )
    by_queue = {queue: count for queue, count in cur.fetchall()}
    total = sum(by_task.values())
    cur.execute(
        "INSERT INTO daily_reports (report_date, total, by_task, by_queue, task_id)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (report_date) DO UPDATE SET"
        " total = EXCLUDED.total, by_task = EXCLUDED.by_task, by_queue = EXCLUDED.by_queue,"
        " generated_at = now(), task_id = EXCLUDED.task_id",
        (day, total, Json(by_task), Json(by_queue), task_id),
    )
    return {"report_date": day.isoformat(), "total": total, "by_task": by_task}


@shared_task(bind=True, base=RecordingTask, name="tasks.reports.generate_daily_reports")
def generate_daily_reports(self: RecordingTask, day: str | None = None) -> dict[str, Any]:
    """Aggregate one UTC day (default: yesterday) into daily_reports."""
    target = report_day(day)
    context = self.context()
    return apply_once(
        self.service.db, context, self.name, lambda cur: aggregate(cur, target, context["task_id"])
    )
