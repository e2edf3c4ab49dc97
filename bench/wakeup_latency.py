"""Publish to decision: event-driven detection against polling, side by side in one run.

    python -m bench.wakeup_latency [--trials 15] [--interval 2.0]

The real loop (scaler.loop.Scaler) on a redis-server of this run's own (notify-keyspace-events
Kl), one service at zero with min 0. Its backend is the real local backend with the scale call
recorded instead of starting a worker (what is timed is detection and decision, not a worker's
boot: benchmark 1 times the rest). Each trial resets the service to zero, waits for a cycle (so
the loop has re-armed it), waits a random phase of the interval, publishes one task through
Celery and times publish -> the scale call. Modes: **events** (a RedisKeyspaceDetector rings the
loop) and **polling** (no detector: the next tick sees it). Prints medians, p95 and the worst.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis
from celery import Celery

from scaler.backends.base import ScaleResult, ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.fencing import UNFENCED, Fence
from scaler.loop import PolicySource, Scaler
from scaler.policy import parse_policy
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.wakeup import RedisKeyspaceDetector

QUEUE = "io_intensive"


class CountingBackend(LocalBackend):
    """Keeps the count the scaler asked for (no process started) and when it was asked."""

    count = 0
    asked_at: float | None = None

    def replicas(self, service: str) -> int:
        return self.count

    def scale(
        self, service: str, replicas: int, fence: Fence = UNFENCED, warm: int | None = None
    ) -> ScaleResult:
        before, self.count = self.count, replicas
        if replicas > before and self.asked_at is None:
            self.asked_at = time.monotonic()
        return ScaleResult(service, before, replicas)


def _wait(probe: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("bench: condition not met in time")
        time.sleep(0.001)


def measure(url: str, mode: str, trials: int, interval_s: float, workdir: Path) -> list[float]:
    """Publish -> scale call, in seconds, for ``trials`` trials in ``mode``."""
    prefix = f"bw{uuid.uuid4().hex[:6]}:"
    app = Celery("bench-wakeup", broker=url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    policy = {
        "interval_s": interval_s,
        "stale_after_s": max(10.0, 2 * interval_s),
        "host": {"cpu_percent": 100, "memory_percent": 100},
        "services": {
            "io": {
                "queues": [QUEUE],
                "min_replicas": 0,
                "max_replicas": 3,
                "scale_up": {"cooldown_s": 0},
            }
        },
    }
    backend = CountingBackend(app=app, workdir=workdir / mode)
    backend.manage([ServiceSpec("io", (QUEUE,))])
    scaler = Scaler(PolicySource(parse_policy(policy, env={})), backend,
                    Collector(queue_reader_for_app(app)))  # fmt: skip
    if mode == "events":
        scaler.detector = RedisKeyspaceDetector(url, scaler.alarm.ring, key_prefix=prefix)
        scaler.detector.start()
    stop = threading.Event()
    loop = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    loop.start()
    client = redis.Redis.from_url(url)
    out: list[float] = []
    try:
        _wait(lambda: scaler.cycles >= 1, 10)
        if scaler.detector is not None:
            _wait(lambda: scaler.detector is not None and scaler.detector.up, 10)
        app.send_task("warm.up", queue=QUEUE)  # the publisher's connection, outside the timing
        for _ in range(trials + 1):
            for key in client.scan_iter(match=f"{prefix}{QUEUE}*"):
                client.delete(key)
            backend.count, backend.asked_at = 0, None
            seen = scaler.cycles
            _wait(lambda s=seen: scaler.cycles > s, 3 * interval_s)  # re-armed: at zero, empty
            time.sleep(random.uniform(0, interval_s))  # a random phase of the cycle
            sent = time.monotonic()
            app.send_task("tasks.io_intensive.wait", queue=QUEUE)
            _wait(lambda: backend.asked_at is not None, 3 * interval_s)
            assert backend.asked_at is not None
            out.append(backend.asked_at - sent)
    finally:
        stop.set()
        loop.join(10)
        if scaler.detector is not None:
            scaler.detector.stop()
        app.close()
    return out[1:]  # the first trial follows the warm-up publish's own decision: left out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server is not on PATH")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--notify-keyspace-events", "Kl"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait(lambda: _pings(url), 10)
        print(f"interval {args.interval} s, {args.trials} trials per mode, publish -> decision")
        print("mode      median_ms  p95_ms  worst_ms")
        with tempfile.TemporaryDirectory() as tmp:
            for mode in ("events", "polling"):
                xs = sorted(measure(url, mode, args.trials, args.interval, Path(tmp)))
                p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
                print(f"{mode:8}  {statistics.median(xs) * 1000:9.1f}  {p95 * 1000:6.1f}  "
                      f"{xs[-1] * 1000:8.1f}")  # fmt: skip
    finally:
        proc.kill()
        proc.wait(10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    main()
