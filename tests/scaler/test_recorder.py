"""The flight recorder on real brokers: task-sent events counted per queue and second, rotation,
export to a trace `scaler simulate` reads, a broker restart survived, `scaler run --record` wired.

Tasks are published with the project's app (apply_async through ``send_task``); no worker runs:
the task-sent event goes out at publish. Each test has its own Redis key prefix (Redis events are
PUBLISHed under it) or its own queue-name prefix on RabbitMQ, and deletes what it created.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from scaler_runs import start_scaler_run
from scaler_support import free_port, own_redis_server, service_app, worker_env
from support.polling import poll_until

from scaler.cli import main
from scaler.recorder import FlightRecorder, RecorderError, RecorderSettings, TraceFile, export_trace
from scaler.recorder.settings import COLUMNS
from scaler.status import render

# No worker runs in these tests, so nothing ever connects to the database.
NO_DATABASE = "postgresql://unused@127.0.0.1:1/unused"
HEADER = re.compile(
    r"^# scaler flight recorder: started \S+, epoch (?P<epoch>[0-9.]+), "
    r"resolution (?P<res>[0-9.]+)$"
)


# -- helpers ----------------------------------------------------------------------------------


def parse_trace(path: Path) -> list[tuple[float, str, int]]:
    """The rows of a trace, checked against the format `scaler simulate --trace` reads: comment
    lines, the header ``t,queue,count``, then rows with t >= 0 ascending and counts >= 0."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines and lines[0] == COLUMNS, f"{path}: no {COLUMNS} header: {lines[:2]}"
    rows = []
    for line in lines[1:]:
        t, queue, count = line.split(",")
        rows.append((float(t), queue, int(count)))
    assert all(t >= 0 and n >= 0 and q for t, q, n in rows), rows
    assert [t for t, _, _ in rows] == sorted(t for t, _, _ in rows), "rows out of order"
    return rows


def segments(path: Path) -> list[tuple[float, list[tuple[float, str, int]]]]:
    """A recorder file as its segments: (header epoch, rows)."""
    out: list[tuple[float, list[tuple[float, str, int]]]] = []
    for line in path.read_text().splitlines():
        header = HEADER.match(line)
        if header:
            out.append((float(header["epoch"]), []))
        elif line and not line.startswith("#") and line != COLUMNS:
            t, queue, count = line.split(",")
            out[-1][1].append((float(t), queue, int(count)))
    return out


def recorded(path: Path) -> dict[tuple[float, str], int]:
    """Every row of FILE.1 and FILE as {(absolute bucket start, queue): count}."""
    counts: dict[tuple[float, str], int] = {}
    for part in (Path(f"{path}.1"), path):
        if part.exists():
            for epoch, rows in segments(part):
                for t, q, n in rows:
                    key = (round(epoch + t, 3), q)
                    counts[key] = counts.get(key, 0) + n
    return counts


def per_queue(path: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    for (_, queue), n in recorded(path).items():
        totals[queue] = totals.get(queue, 0) + n
    return totals


def publish(app: Any, queue: str, count: int) -> tuple[float, float]:
    """Publish ``count`` tasks to one of the five queues; the wall-clock span of the publishes."""
    before = time.time()
    for i in range(count):
        app.send_task("tasks.default.recorded_probe", args=[i], queue=app.settings.queue(queue))
    return before, time.time()


def next_bucket(after: float, epoch: float, res: float) -> None:
    """Wait (polling the clock) until the bucket after the one holding ``after`` has begun."""
    start = epoch + (math.floor((after - epoch) / res) + 1) * res
    poll_until(lambda: time.time() >= start + 0.05, "the next bucket", timeout_s=5, every_s=0.02)


def connected(recorder: FlightRecorder, connects: int = 1) -> bool:
    status = recorder.status()
    return status["state"] == "connected" and status["connects"] >= connects


@pytest.fixture
def recorders() -> Iterator[Callable[..., FlightRecorder]]:
    """Factory of started recorders; each one stopped when the test ends."""
    started: list[FlightRecorder] = []

    def start(app: Any, path: Path, **settings: Any) -> FlightRecorder:
        recorder = FlightRecorder(app, RecorderSettings(path=path, **settings))
        recorder.start()
        started.append(recorder)
        return recorder

    yield start
    for recorder in started:
        recorder.stop()


@pytest.fixture
def redis_app(redis_url: str, key_prefix: str) -> Iterator[Any]:
    prefix = f"{key_prefix}rec{uuid.uuid4().hex[:6]}:"
    app = service_app(worker_env(redis_url, NO_DATABASE, prefix))
    yield app
    app.close()
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def amqp_app(amqp_url: str, redis_url: str, key_prefix: str) -> Iterator[Any]:
    queue_prefix = f"t{uuid.uuid4().hex[:8]}."
    env = worker_env(redis_url, NO_DATABASE, f"{key_prefix}rec{uuid.uuid4().hex[:6]}:")
    env.update(CELERY_BROKER_URL=amqp_url, CELERY_QUEUE_PREFIX=queue_prefix)
    app = service_app(env)
    yield app
    app.close()
    with Connection(amqp_url) as conn:
        for name in ("default", "cpu_intensive", "io_intensive", "priority", "scheduled"):
            channel = conn.channel()
            try:
                channel.queue_delete(queue_prefix + name)
                channel.exchange_delete(queue_prefix + name)
            except Exception:
                pass  # never declared (nothing published there)


# -- recording on both brokers ----------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_counts_per_queue_and_bucket_are_exact(
    broker: str,
    request: pytest.FixtureRequest,
    recorders: Callable[..., FlightRecorder],
    tmp_path: Path,
) -> None:
    app = request.getfixturevalue("redis_app" if broker == "redis" else "amqp_app")
    path = tmp_path / "arrivals.csv"
    recorder = recorders(app, path, flush_interval_s=0.5)
    poll_until(lambda: connected(recorder), f"the recorder connected to {broker}", timeout_s=20)
    (epoch, _), *_ = segments(path)
    io, prio = app.settings.queue("io_intensive"), app.settings.queue("priority")

    first = publish(app, "io_intensive", 7)
    next_bucket(first[1], epoch, 1.0)
    second_io = publish(app, "io_intensive", 3)
    second_prio = publish(app, "priority", 5)

    # The periodic flush writes them (no stop needed), and not one more.
    poll_until(lambda: per_queue(path) == {io: 10, prio: 5}, "10 io and 5 priority rows",
               timeout_s=15)  # fmt: skip
    rows = recorded(path)

    def buckets(span: tuple[float, float]) -> set[float]:
        """The buckets a publish that began and ended at ``span`` may fall in (their starts)."""
        return {round(epoch + math.floor(at - epoch), 3) for at in span}

    io_rows = {t: n for (t, q), n in rows.items() if q == io}
    assert sum(n for t, n in io_rows.items() if t in buckets(first)) == 7, (io_rows, first)
    assert sum(n for t, n in io_rows.items() if t in buckets(second_io)) == 3, io_rows
    prio_rows = {t: n for (t, q), n in rows.items() if q == prio}
    assert set(prio_rows) <= buckets(second_prio), (prio_rows, second_prio)
    assert recorder.status()["events"] == 15
    recorder.stop()
    assert per_queue(path) == {io: 10, prio: 5}  # the final flush adds nothing twice


def test_a_late_flush_is_final_on_stop(
    redis_app: Any, recorders: Callable[..., FlightRecorder], tmp_path: Path
) -> None:
    """Buckets still open at shutdown are written by stop(), not lost."""
    path = tmp_path / "arrivals.csv"
    recorder = recorders(redis_app, path, flush_interval_s=3600)  # never flushes by itself
    poll_until(lambda: connected(recorder), "the recorder connected")
    publish(redis_app, "default", 4)
    poll_until(lambda: recorder.status()["events"] == 4, "4 events received")
    assert per_queue(path) == {}
    recorder.stop()
    assert per_queue(path) == {redis_app.settings.queue("default"): 4}
    assert recorder.status()["state"] == "stopped"


# -- rotation and export ----------------------------------------------------------------------


def test_rotation_bounds_the_file_and_export_merges_the_generations(
    redis_app: Any, recorders: Callable[..., FlightRecorder], tmp_path: Path
) -> None:
    path = tmp_path / "arrivals.csv"
    cap = 400
    recorder = recorders(redis_app, path, max_bytes=cap, resolution_s=0.1, flush_interval_s=0.2)
    poll_until(lambda: connected(recorder), "the recorder connected")
    queues = ("default", "io_intensive", "priority")
    sent = 0
    deadline = time.monotonic() + 2.5  # ~25 buckets x 3 queues: several rotations at 400 bytes
    while time.monotonic() < deadline:
        for q in queues:
            publish(redis_app, q, 1)
            sent += 1
    poll_until(lambda: recorder.status()["events"] == sent, f"{sent} events received")
    recorder.stop()

    assert recorder.status()["rotations"] >= 2
    for part in (path, Path(f"{path}.1")):
        assert part.stat().st_size <= cap, f"{part}: {part.stat().st_size} bytes > {cap}"
        assert HEADER.match(part.read_text().splitlines()[0]), f"{part} starts with no header"
    assert not Path(f"{path}.2").exists()
    kept = recorded(path)
    assert 0 < sum(kept.values()) < sent  # the oldest generation was dropped

    out = tmp_path / "trace.csv"
    assert main(["record", "export", "--file", str(path), "--out", str(out)]) == 0
    rows = parse_trace(out)
    assert rows[0][0] == 0.0
    first = min(t for t, _ in kept)
    expected = sorted((round(t - first, 3), q, n) for (t, q), n in kept.items())
    assert [(round(t, 3), q, n) for t, q, n in rows] == expected
    simulate = pytest.importorskip("scaler.simulate.trace")  # the reader of `scaler simulate`
    trace = simulate.load_trace(out)
    assert sum(n for _, _, n in trace.rows) == sum(kept.values())


def test_export_merges_restarts_and_rotated_files_and_keeps_the_last_hours(tmp_path: Path) -> None:
    """Two runs appended to one file, a rotation in between: one trace, t=0 at its first row."""
    path = tmp_path / "arrivals.csv"
    t0 = 1_700_000_000.0
    first = TraceFile(path, max_bytes=125, resolution_s=1.0, epoch=t0, grace_s=0.0)
    first.open()
    for at, queue, n in [(0, "a", 2), (1, "b", 1), (5, "a", 3), (9, "b", 4)]:
        first.add(queue, t0 + at + 0.5, n)
        first.flush(t0 + at + 1.0)
    first.close()
    assert first.rotations >= 1 and Path(f"{path}.1").exists()
    # A restart a minute later appends a segment with its own epoch to FILE.
    second = TraceFile(path, max_bytes=10_000, resolution_s=1.0, epoch=t0 + 60.25, grace_s=0.0)
    second.open()
    second.add("a", t0 + 61.0, 6)
    second.flush(t0 + 70.0, final=True)
    second.close()
    # A row a crash cut short, and a line before any header, are skipped, not fatal.
    with path.open("a") as f:
        f.write("12,a")

    out = tmp_path / "trace.csv"
    summary = export_trace(path, out)
    assert parse_trace(out) == [
        (0.0, "a", 2), (1.0, "b", 1), (5.0, "a", 3), (9.0, "b", 4), (60.25, "a", 6),
    ]  # fmt: skip
    assert summary.tasks == 16 and summary.queues == ("a", "b") and summary.skipped_lines == 1

    recent = tmp_path / "recent.csv"
    summary = export_trace(path, recent, since_hours=30 / 3600, now=t0 + 90.0)
    assert parse_trace(recent) == [(0.0, "a", 6)]
    assert summary.first_epoch == t0 + 60.25


def test_export_without_a_recording_fails_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.csv"
    code = main(["record", "export", "--file", str(missing), "--out", str(tmp_path / "t.csv")])
    assert code == 1
    assert str(missing) in capsys.readouterr().err


# -- the broker going away --------------------------------------------------------------------


def redis_on_port(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not on PATH"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    poll_until(up, f"redis-server on port {port}", timeout_s=10)
    return proc


def test_a_broker_restart_is_survived(
    recorders: Callable[..., FlightRecorder], tmp_path: Path
) -> None:
    path = tmp_path / "arrivals.csv"
    with own_redis_server() as (url, proc):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        app = service_app(worker_env(url, NO_DATABASE, "rec:"))
        recorder = recorders(app, path, flush_interval_s=0.5, backoff_s=(0.2, 1.0))
        poll_until(lambda: connected(recorder), "the recorder connected")
        queue = app.settings.queue("default")
        publish(app, "default", 2)
        poll_until(lambda: per_queue(path) == {queue: 2}, "2 rows before the outage")

        proc.kill()
        proc.wait(10)
        poll_until(lambda: recorder.status()["state"] == "disconnected", "disconnected state")
        assert recorder.status()["error"]
        shown = render({"services": {}, "recorder": recorder.status()}, time.time())
        assert "recorder disconnected for" in shown and str(path) in shown
        restarted = redis_on_port(port)
        try:
            poll_until(lambda: connected(recorder, connects=2), "reconnected", timeout_s=20)
            publish(app, "default", 3)
            poll_until(lambda: per_queue(path) == {queue: 5}, "3 more rows after the restart")
        finally:
            recorder.stop()
            app.close()
            restarted.kill()
            restarted.wait(10)


def test_no_broker_at_start_is_reported_and_stop_is_prompt(
    recorders: Callable[..., FlightRecorder], tmp_path: Path
) -> None:
    app = service_app(worker_env(f"redis://127.0.0.1:{free_port()}/0", NO_DATABASE, "rec:"))
    path = tmp_path / "arrivals.csv"
    recorder = recorders(app, path, backoff_s=(0.2, 1.0))
    poll_until(lambda: recorder.status()["state"] == "disconnected", "disconnected state")
    assert "Error" in str(recorder.status()["error"])
    started = time.monotonic()
    recorder.stop()
    assert time.monotonic() - started < 3.0
    assert [rows for _, rows in segments(path)] == [[]]  # the header, no rows
    app.close()


def test_a_second_recorder_on_the_same_file_waits_then_takes_over(
    redis_app: Any, recorders: Callable[..., FlightRecorder], tmp_path: Path
) -> None:
    path = tmp_path / "arrivals.csv"
    one = recorders(redis_app, path, flush_interval_s=0.5, backoff_s=(0.2, 0.5))
    poll_until(lambda: connected(one), "the first recorder connected")
    two = recorders(redis_app, path, flush_interval_s=0.5, backoff_s=(0.2, 0.5))
    poll_until(lambda: two.status()["state"] == "waiting-for-lock", "the second one waiting")
    publish(redis_app, "default", 2)
    poll_until(lambda: one.status()["events"] == 2, "the first recorder counted 2")
    one.stop()
    poll_until(lambda: connected(two), "the second recorder took over")
    publish(redis_app, "default", 3)
    poll_until(lambda: two.status()["events"] == 3, "the second recorder counted 3")
    two.stop()
    assert per_queue(path) == {redis_app.settings.queue("default"): 5}  # each counted once
    assert len(segments(path)) == 2


# -- settings and `scaler run --record` -------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named", "expected"),
    [
        ({"max_mb": "-5"}, "--record-max-mb / SCALER_RECORD_MAX_MB='-5'", "megabytes > 0"),
        ({"max_mb": "lots"}, "--record-max-mb / SCALER_RECORD_MAX_MB='lots'", "megabytes > 0"),
        ({"resolution_s": "0"}, "--record-resolution / SCALER_RECORD_RESOLUTION_S='0'", "> 0"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(
    values: dict[str, str], named: str, expected: str, tmp_path: Path
) -> None:
    with pytest.raises(RecorderError) as caught:
        RecorderSettings.from_values(str(tmp_path / "a.csv"), **values)
    assert named in str(caught.value) and expected in str(caught.value)


def test_an_unwritable_path_is_refused_by_scaler_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SCALER_RECORD_FILE", str(blocker / "arrivals.csv"))
    with pytest.raises(SystemExit) as caught:
        main(["run", "--policy", str(tmp_path / "unused.yaml")])
    message = str(caught.value)
    assert "SCALER_RECORD_FILE" in message and "a-file/arrivals.csv" in message
    assert "expected a file path the scaler can create and append to" in message
    monkeypatch.setenv("SCALER_RECORD_FILE", str(tmp_path / "ok.csv"))
    monkeypatch.setenv("SCALER_RECORD_MAX_MB", "-1")
    with pytest.raises(SystemExit, match="SCALER_RECORD_MAX_MB='-1': expected a size"):
        main(["run", "--policy", str(tmp_path / "unused.yaml")])


POLICY = """
interval_s: 0.5
services:
  worker-io:
    queues: [io_intensive]
    min_replicas: 0
    max_replicas: 2
"""


def test_scaler_run_records_and_flushes_on_shutdown(
    redis_url: str, database_url: str, key_prefix: str, tmp_path: Path
) -> None:
    own = f"{key_prefix}recrun{uuid.uuid4().hex[:6]}:"
    env = {**worker_env(redis_url, database_url, own), "SCALER_KEY_PREFIX": own}
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    path = tmp_path / "rec" / "arrivals.csv"
    run = start_scaler_run("rec", policy, tmp_path / "workers", tmp_path, env,
                           "--record", str(path), "--no-leader-election")  # fmt: skip
    try:
        poll_until(lambda: any(e.get("event") == "recorder-connected" for e in run.logs()),
                   "the recorder connected in scaler run", timeout_s=30)  # fmt: skip
        app = service_app(env)
        publish(app, "io_intensive", 6)
        app.close()
    finally:
        assert run.stop(signal.SIGTERM) == 0
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{own}*"))
        if keys:
            client.delete(*keys)
        client.close()
    assert per_queue(path) == {"io_intensive": 6}
    assert any(e.get("event") == "start" and e.get("record") == str(path) for e in run.logs())
