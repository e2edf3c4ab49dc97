"""Event-driven detection (scaler.wakeup) with the real loop on a real Redis and RabbitMQ.

Each Redis test runs a redis-server of its own (it switches notifications on and off, kills and
restarts it). The backend is the real local backend with its scale call recorded instead of
starting worker processes (as in test_loop.py): what is under test is when the loop decides,
not how a worker boots. Timing is judged against the loop's own interval, never in absolute terms.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from scaler_support import free_port
from support.polling import poll_until

from scaler.backends.base import ScaleResult, ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.fencing import UNFENCED, Fence
from scaler.loop import PolicySource, Scaler
from scaler.metrics import ScalerMetrics
from scaler.policy import parse_policy
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.status import render
from scaler.wakeup import (
    Alarm,
    CelerySentDetector,
    Debouncer,
    RedisKeyspaceDetector,
    WakeupDetector,
    Watch,
)

QUEUE = "io_intensive"


class RecordingBackend(LocalBackend):
    """The local backend with each scale call recorded (time, count) instead of acted on: the
    service stays at zero, so it stays armed and every arrival may wake the loop."""

    calls: list[tuple[float, int]]

    def scale(self, service: str, replicas: int, fence: Fence = UNFENCED) -> ScaleResult:
        self.calls.append((time.monotonic(), replicas))
        return ScaleResult(service, self.replicas(service), replicas)


class RedisServer:
    """A redis-server of the test's own on a fixed port, so it can be killed and started again."""

    def __init__(self, *args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        self.binary, self.port, self.args = binary, free_port(), args
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        poll_until(up, f"redis-server on port {self.port}", timeout_s=10, every_s=0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def redis_server(*args: str) -> Iterator[RedisServer]:
    server = RedisServer(*args)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def make_scaler(
    tmp_path: Path,
    app: Celery,
    interval_s: float,
    io: dict[str, Any] | None = None,
    backend_class: type[RecordingBackend] = RecordingBackend,
) -> tuple[Scaler, RecordingBackend]:
    """The real loop on ``app``'s queues, with io's rules (min 0, max 3 unless ``io`` says)."""
    policy = {
        "interval_s": interval_s,
        "stale_after_s": max(10.0, 2 * interval_s),
        "host": {"cpu_percent": 100, "memory_percent": 100},
        "services": {"io": {"queues": [QUEUE], "min_replicas": 0, "max_replicas": 3, **(io or {})}},
    }
    backend = backend_class(app=app, workdir=tmp_path / "workers")
    backend.calls = []
    backend.manage([ServiceSpec("io", (QUEUE,))])
    scaler = Scaler(
        PolicySource(parse_policy(policy, env={})),
        backend,
        Collector(queue_reader_for_app(app)),
        metrics=ScalerMetrics(),
    )
    return scaler, backend


@contextmanager
def running(scaler: Scaler, detector: WakeupDetector) -> Iterator[None]:
    """The real loop in a thread with ``detector`` started; both stopped after."""
    scaler.detector = detector
    detector.start()
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        detector.stop()


def redis_app(url: str) -> Celery:
    app = Celery("wakeup-test", broker=url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"wk{uuid.uuid4().hex[:6]}:"}
    return app


def snapshot_detection(scaler: Scaler) -> dict[str, Any]:
    """The detection part of the loop's last status snapshot (what /status serves)."""
    return dict(scaler.status_view().get("detection") or {})


def detection_up(scaler: Scaler) -> float:
    assert scaler.metrics is not None
    text = scaler.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "scaler_event_detection_up":
            return float(family.samples[0].value)
    raise AssertionError("scaler_event_detection_up not exported")


def test_an_arrival_decides_at_once_and_a_flood_costs_a_few_decisions(tmp_path: Path) -> None:
    interval_s = 30.0
    with redis_server("--notify-keyspace-events", "Kl") as server:
        app = redis_app(server.url)
        scaler, backend = make_scaler(tmp_path, app, interval_s)
        prefix = app.conf.broker_transport_options["global_keyprefix"]
        detector = RedisKeyspaceDetector(server.url, scaler.alarm.ring, key_prefix=prefix)
        with running(scaler, detector):
            poll_until(lambda: scaler.cycles >= 1 and detector.up, "the first cycle, events up")
            assert not backend.calls, "an empty queue at zero: nothing to do"
            sent = time.monotonic()
            app.send_task("tasks.io_intensive.wait", queue=QUEUE)
            poll_until(lambda: backend.calls, "a scale-up decided on the arrival", timeout_s=10)
            took = backend.calls[0][0] - sent
            assert backend.calls[0][1] == 1
            assert took < interval_s / 10, f"decided {took:.2f} s after the publish"
            assert scaler.cycles == 2, "one decision for one arrival"
            assert detector.status()["wakeups"] == {"io": 1}

            # The backlog that decision saw disarms the service (its ticks decide it now): a new
            # one arms it again once a cycle sees nothing waiting.
            assert "io" not in detector.status()["armed"]
            redis.Redis.from_url(server.url).flushdb()
            scaler.alarm.ring({"tests"})  # a cycle now rather than in 30 s
            poll_until(lambda: "io" in detector.status()["armed"], "armed again, nothing waits")

            # A flood: 1000 publishes onto the empty queue of a service at zero.
            before = scaler.cycles
            started = time.monotonic()
            for _ in range(1000):
                app.send_task("tasks.io_intensive.wait", queue=QUEUE)
            flood_s = time.monotonic() - started
            poll_until(lambda: detector.status()["arrivals"] >= 1001, "every push seen")
            wakeups = poll_until(  # the last window's trailing ring, if one was pending
                lambda: not detector._debouncer._pending and detector.status()["wakeups"]["io"],
                "the debounce windows closed",
            )
            poll_until(lambda: scaler.cycles >= before + wakeups - 1, "the woken cycles ran")
            extra = scaler.cycles - before
            bound = 2 + flood_s / detector.status()["debounce_s"]
            assert 1 <= extra <= bound, f"{extra} decisions for 1000 arrivals in {flood_s:.2f} s"
            folded = detector.status()["coalesced"] + detector.status()["ignored"]
            assert folded >= 1000 - wakeups  # after the first, folded or (disarmed) ignored
            assert detection_up(scaler) == 1.0
            assert "detection events" in render(scaler.status_view())


def test_without_notifications_or_broker_it_polls_says_so_and_recovers(tmp_path: Path) -> None:
    interval_s = 0.5
    with redis_server() as server:  # notify-keyspace-events left empty: Redis's default
        app = redis_app(server.url)
        scaler, backend = make_scaler(tmp_path, app, interval_s)
        prefix = app.conf.broker_transport_options["global_keyprefix"]
        detector = RedisKeyspaceDetector(
            server.url, scaler.alarm.ring, key_prefix=prefix, probe_timeout_s=0.3,
            recheck_s=0.5, backoff_s=(0.1, 0.4),
        )  # fmt: skip
        with running(scaler, detector):
            poll_until(lambda: "needs K" in snapshot_detection(scaler).get("reason", ""),
                       "status to say why it polls")  # fmt: skip
            status = snapshot_detection(scaler)
            assert status["mode"] == "polling"
            assert "notify-keyspace-events is ''" in status["reason"]
            assert "detection POLLING" in render(scaler.status_view())
            assert detection_up(scaler) == 0.0
            app.send_task("tasks.io_intensive.wait", queue=QUEUE)  # the tick still sees it
            poll_until(lambda: backend.calls, "a scale-up at the interval", timeout_s=10)
            assert not detector.status()["wakeups"]

            redis.Redis.from_url(server.url).config_set("notify-keyspace-events", "Kl")
            poll_until(lambda: detector.up, "events once notifications are on", timeout_s=10)
            poll_until(lambda: detection_up(scaler) == 1.0, "the metric to follow", timeout_s=10)

            redis.Redis.from_url(server.url).flushdb()  # nothing waits: the service is armed
            poll_until(lambda: "io" in detector.status()["armed"], "armed once nothing waits")
            server.kill()  # the event stream is cut
            poll_until(lambda: not detector.up, "polling once the broker is gone", timeout_s=10)
            assert "event stream lost" in (detector.status()["reason"] or "")
            connects = detector.status()["connects"]
            server.args = ("--notify-keyspace-events", "Kl")  # a restarted broker, configured
            server.start()
            poll_until(lambda: detector.up, "events again after the restart", timeout_s=15)
            assert detector.status()["connects"] > connects
            # Back from an outage it rings the armed service once (a backlog may have landed).
            poll_until(lambda: detector.status()["wakeups"].get("io"), "the catch-up ring")


def test_task_sent_events_wake_an_armed_service_on_rabbitmq(amqp_url: str) -> None:
    queue = f"wk-{uuid.uuid4().hex[:8]}"  # a queue of the test's own: no other run's events
    app = Celery("wakeup-amqp-test", broker=amqp_url, set_as_current=False)
    app.conf.task_send_sent_event = True
    alarm = Alarm()
    stop = threading.Event()
    detector = CelerySentDetector(app, alarm.ring)
    detector.watch(Watch({queue: "io"}, frozenset({"io"})))
    detector.start()
    try:
        poll_until(lambda: detector.up, "the task-sent stream", timeout_s=20)
        app.send_task("tasks.io_intensive.wait", queue=queue)
        assert alarm.wait(10.0, stop) == {"io"}
        detector.watch(Watch({queue: "io"}, frozenset()))  # busy above its minimum: not armed
        app.send_task("tasks.io_intensive.wait", queue=queue)
        poll_until(lambda: detector.status()["ignored"] >= 1, "the second arrival seen")
        assert detector.status()["wakeups"] == {"io": 1}
    finally:
        detector.stop()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        app.close()


def test_an_arrival_taken_at_once_does_not_hold_back_the_backlog_right_behind_it() -> None:
    """A burst's first message is taken by an idle consumer (nothing waits: no ring), its next
    ones wait: they must ring within the short recheck, not at the end of a whole window."""
    rang: list[tuple[float, set[str]]] = []
    waiting = {"io": False}
    debouncer = Debouncer(
        lambda services: rang.append((time.monotonic(), services)),
        armed=lambda s: True,
        window_s=lambda: 1.0,
        backlog=lambda s: waiting[s],
    )
    debouncer.start()
    try:
        debouncer.arrival("io")  # taken at once: checked, nothing waits, no ring
        assert rang == [] and debouncer.taken_at_once == 1
        waiting["io"] = True  # the next messages find the consumers busy
        sent = time.monotonic()
        debouncer.arrival("io")
        poll_until(lambda: rang, "the ring for the backlog", timeout_s=5)
        assert rang[0][1] == {"io"}
        assert rang[0][0] - sent < 0.5, "held back for the whole debounce window"
    finally:
        debouncer.stop()


def test_a_service_armed_at_a_level_rings_once_the_backlog_reaches_it_without_a_window() -> None:
    """A held decision arms its service at a level: arrivals below it ring nothing, the first
    one over it rings at once (no debounce window: the level is the debounce), later ones are
    folded until the loop arms again."""
    rang: list[set[str]] = []
    waiting = {"io": 3}
    level = {"io": 10}
    debouncer = Debouncer(
        rang.append,
        armed=lambda s: True,
        window_s=lambda: 60.0,  # a whole minute: a ring at the level must not wait for it
        backlog=lambda s: waiting[s] > level[s],
        level=lambda s: level[s],
    )
    debouncer.start()
    try:
        for n in range(4, 11):
            waiting["io"] = n
            debouncer.arrival("io")
        assert rang == []
        waiting["io"] = 11
        debouncer.arrival("io")
        assert rang == [{"io"}]
        waiting["io"] = 40
        debouncer.arrival("io")
        assert rang == [{"io"}] and debouncer.coalesced == 1
        debouncer.rearm()  # the loop's next arming, still at the level
        debouncer.arrival("io")
        assert rang == [{"io"}, {"io"}]
    finally:
        debouncer.stop()


class HeldAtOneBackend(RecordingBackend):
    """One serving replica as far as the loop can tell (the count is the test's), so a small
    backlog is within the target and the decision holds."""

    def replicas(self, service: str) -> int:
        return 1


def test_a_burst_wakes_the_loop_once_it_reaches_what_the_target_scales_on(
    tmp_path: Path,
) -> None:
    """On a real Redis: io at its minimum of one replica is armed at the backlog its target
    scales on. A burst's first messages, within the target, wake nothing (a decision would
    hold); the rest of it rings once it reaches the level: the scale-up comes within a fraction
    of the 30 s interval, not at the next tick."""
    with redis_server("--notify-keyspace-events", "Kl") as server:
        app = redis_app(server.url)
        io = {"min_replicas": 1, "target": {"tasks_per_replica": 10, "tolerance": 0.15}}
        scaler, backend = make_scaler(tmp_path, app, 30, io, HeldAtOneBackend)
        detector = RedisKeyspaceDetector(
            server.url, scaler.alarm.ring,
            key_prefix=app.conf.broker_transport_options["global_keyprefix"],
        )  # fmt: skip
        with running(scaler, detector):
            poll_until(lambda: detector.up and "io" in detector.status()["armed"],
                       "detection up and io armed", timeout_s=10)  # fmt: skip
            with app.producer_or_acquire() as producer:
                for n in range(3):
                    producer.publish({"n": n}, routing_key=QUEUE, exchange="")
            poll_until(
                lambda: detector.status()["levels"].get("io") == 11,
                "io armed at 11 (over 10 x 1.15 of work)",
                timeout_s=10,
            )
            poll_until(lambda: detector.status()["arrivals"] >= 3, "the 3 arrivals seen")
            assert backend.calls == [] and detector.status()["wakeups"] == {}
            sent = time.monotonic()
            with app.producer_or_acquire() as producer:
                for n in range(3, 20):
                    producer.publish({"n": n}, routing_key=QUEUE, exchange="")
            poll_until(lambda: backend.calls, "a scale-up", timeout_s=40)
            at, replicas = backend.calls[0]
            assert replicas == 2
            assert at - sent < 30 / 4, f"scaled {at - sent:.1f} s after: waited for a tick"


def test_arrivals_while_the_loop_decides_are_judged_against_its_new_arming_at_once() -> None:
    """While a cycle runs nothing rings (a ring would be judged against the arming the cycle is
    replacing); when it arms again, what arrived meanwhile is judged at once: at a level, a
    backlog already over it rings then, not at the next arrival or the window's end; a service
    the cycle left unarmed does not ring at all."""
    rang: list[set[str]] = []
    waiting = {"io": 0, "cpu": 0}
    level = {"io": 0, "cpu": 0}
    armed = {"io": True, "cpu": True}
    debouncer = Debouncer(
        rang.append,
        armed=lambda s: armed[s],
        window_s=lambda: 60.0,
        backlog=lambda s: waiting[s] > level[s],
        level=lambda s: level[s],
    )
    debouncer.start()
    try:
        debouncer.pause()  # a cycle starts
        waiting.update(io=40, cpu=5)
        debouncer.arrival("io")
        debouncer.arrival("cpu")
        assert rang == []
        level["io"] = 31  # the cycle held io at a level; cpu scaled up: not armed
        armed["cpu"] = False
        debouncer.rearm()
        assert rang == [{"io"}], "the held backlog over the new level rings at the arming"
        debouncer.pause()
        debouncer.arrival("cpu")
        debouncer.resume()  # a cycle that failed before arming
        assert rang == [{"io"}]
    finally:
        debouncer.stop()


def test_a_burst_held_while_the_first_cycle_decides_rings_without_waiting_for_a_window() -> None:
    """A service that never rang, armed at 0, whose first arrivals came while a cycle decided:
    when the cycle arms again they ring at once (its first arrival would have), not at the next
    tick (issue 18, defect 2: the held arrival waited for a fire time it never had)."""
    rang: list[set[str]] = []
    debouncer = Debouncer(rang.append, armed=lambda s: True, window_s=lambda: 60.0)
    debouncer.start()
    try:
        debouncer.pause()  # the scaler's first cycle decides
        debouncer.arrival("io")
        debouncer.rearm()
        poll_until(lambda: rang, "the held arrival's ring", timeout_s=10)
        assert rang == [{"io"}]
        debouncer.pause()  # within the window now: folded into the ring at its end
        debouncer.arrival("io")
        debouncer.rearm()
        assert rang == [{"io"}] and debouncer.coalesced >= 1
    finally:
        debouncer.stop()


def test_a_pending_service_that_never_rang_comes_due() -> None:
    """The trailing ring of a service with no fire time is due at once, not never."""
    rang: list[set[str]] = []
    debouncer = Debouncer(rang.append, armed=lambda s: True, window_s=lambda: 60.0)
    debouncer.start()
    try:
        with debouncer._cond:  # a pending service that never fired (how rearm used to leave it)
            debouncer._pending.add("cpu")
            debouncer._cond.notify_all()
        poll_until(lambda: rang, "the pending service's ring", timeout_s=10)
        assert rang == [{"cpu"}]
    finally:
        debouncer.stop()
