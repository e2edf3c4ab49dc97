"""Success and failure records in bounded Redis lists; a recording failure never fails a task."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import redis

from services.records import FAILURES, STARTS, SUCCESSES, TaskRecorder


def test_lists_keep_the_latest_1000(redis_url: str, key_prefix: str) -> None:
    recorder = TaskRecorder(redis_url, f"{key_prefix}rec-bound:", limit=1000, max_chars=2000)
    try:
        for i in range(1005):
            recorder.record_success(f"id-{i}", "t", {"i": i})
        records = recorder.latest(SUCCESSES)
        assert len(records) == 1000
        assert records[0]["task_id"] == "id-1004" and records[-1]["task_id"] == "id-5"
    finally:
        recorder.client.delete(recorder.key(SUCCESSES))


def test_large_payloads_are_truncated(redis_url: str, key_prefix: str) -> None:
    recorder = TaskRecorder(redis_url, f"{key_prefix}rec-trunc:", limit=10, max_chars=200)
    try:
        recorder.record_failure("id", "t", "E" * 5000, ["x" * 5000], {"k": "v" * 5000})
        (record,) = recorder.latest(FAILURES)
        assert len(json.dumps(record)) < 1500
        assert record["args"]["truncated"] is True and record["args"]["original_chars"] > 5000
        assert len(record["error"]) == 200
    finally:
        recorder.client.delete(recorder.key(FAILURES))


def test_unreachable_redis_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recorder = TaskRecorder(f"redis://127.0.0.1:{port}/0", "x:", limit=10, max_chars=200)
    recorder.record_success("id", "t", {"ok": True})
    assert "could not record task_successes of task id" in caplog.text


@pytest.mark.slow
def test_worker_records_successes_failures_and_bounds_them(
    redis_env: Any, start_worker: Any, redis_url: str, poll: Any
) -> None:
    app = redis_env.app()
    start_worker(redis_env, ["default"], extra_env={"TASK_RECORDS_LIMIT": "3"})
    ok = [app.send_task("tasks.default.record", kwargs={"key": str(i)}) for i in range(5)]
    for result in ok:
        result.get(timeout=30)
    bad = app.send_task("tasks.default.fail", kwargs={"message": "boom"})
    with pytest.raises(RuntimeError, match="boom"):
        bad.get(timeout=30)
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    client = redis.Redis.from_url(redis_url)

    def lists() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        successes = [json.loads(r) for r in client.lrange(f"{prefix}{SUCCESSES}", 0, -1)]
        failures = [json.loads(r) for r in client.lrange(f"{prefix}{FAILURES}", 0, -1)]
        # Recording runs just after the result is stored: wait for the last of each.
        done = failures and successes and successes[0]["task_id"] == ok[-1].id
        return (successes, failures) if done else None

    successes, failures = poll(lists, "success and failure records")
    assert [s["task_id"] for s in successes] == [r.id for r in reversed(ok)][:3]
    assert successes[0]["result"]["key"] == "4"
    assert len(failures) == 1 and failures[0]["task_id"] == bad.id
    assert failures[0]["error"] == "RuntimeError: boom"


@pytest.mark.slow
def test_recording_failure_does_not_fail_the_task(
    redis_env: Any, start_worker: Any, poll: Any
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = redis_env.app()
    worker = start_worker(
        redis_env, ["default"], extra_env={"TASK_RECORDS_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    )
    result = app.send_task("tasks.default.record", kwargs={"key": "still-ok"}).get(timeout=30)
    assert result["key"] == "still-ok"
    # on_success runs just after the result is stored: wait for its log line.
    poll(lambda: "could not record task_successes" in worker.log(), "the recording error logged")
    assert "Traceback" in worker.log()


@pytest.mark.slow
def test_worker_records_each_start_before_the_work(
    redis_env: Any, start_worker: Any, redis_url: str, poll: Any
) -> None:
    """io tasks (record_starts) record their start first: node, hostname, pid, wall time;
    tasks that do not ask for it record none."""
    app = redis_env.app()
    start_worker(redis_env, ["io_intensive", "default"])
    app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.2}, task_id="start-1").get(
        timeout=30
    )
    app.send_task("tasks.default.record", kwargs={"key": "k"}, task_id="start-2").get(timeout=30)
    prefix = redis_env.env["CELERY_KEY_PREFIX"]
    client = redis.Redis.from_url(redis_url)
    try:
        starts = [json.loads(r) for r in client.lrange(f"{prefix}{STARTS}", 0, -1)]
        success = poll(
            lambda: next(
                (
                    record
                    for raw in client.lrange(f"{prefix}{SUCCESSES}", 0, -1)
                    if (record := json.loads(raw))["task_id"] == "start-1"
                ),
                None,
            ),
            "the success record",
        )
    finally:
        client.close()
    (start,) = starts
    assert start["task_id"] == "start-1" and start["task"] == "tasks.io_intensive.wait"
    assert "@" in start["node"]
    assert start["hostname"] and start["pid"] > 0 and start["retries"] == 0
    assert start["redelivered"] is False
    assert start["timestamp"] <= success["timestamp"] - 0.2
