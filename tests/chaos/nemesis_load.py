"""The nemesis campaign's load: steady io tasks, bursts of them, and long tasks for the solo pool.

The whole plan (every send's moment, queue and duration) is drawn up front from the seed and the
campaign's duration, so a run replays: `plan_load(seed, duration_s)` is a pure function. A thread
sends it on time (late, never skipped, when a fault blocks the publish: a paused or restarting
Redis), with unique task ids (the id is also the effect key, as in exactly_once.send_burst).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from stack_env import IO_QUEUE, WAIT_TASK

# worker-scheduled runs the solo pool in the chaos stack (compose.stack-chaos.yaml): the long tasks
# go there by queue name (tasks.io_intensive.wait is routed to io_intensive otherwise).
SOLO_QUEUE = "scheduled"
ALLOCATE_TASK = "tasks.io_intensive.allocate"

# Steady io tasks (a Poisson stream), bursts of io tasks, and one long task now and then: about
# 1.5 task-seconds per second on worker-io (4 threads a replica, 1..3 replicas), up to 20 more in
# a burst, and the solo worker about half busy (one task at a time, 1..2 replicas).
STEADY_PER_S = 1.5
STEADY_S = (0.2, 1.5)
BURST_EVERY_S = (15.0, 30.0)
BURST_SIZE = (15, 35)
BURST_S = (0.5, 2.0)
LONG_EVERY_S = (5.0, 10.0)
LONG_S = (3.0, 6.0)


@dataclass(frozen=True)
class PlannedSend:
    at_s: float  # after the campaign's start
    queue: str
    duration: float
    burst: bool = False


@dataclass(frozen=True)
class Sent:
    task_id: str
    queue: str
    duration: float  # the task's own time (seconds of wait, or the allocation's hold)
    sent_at: float  # wall time (time.time()) just before the publish
    confirmed: bool  # the publish returned; False: it raised (the message may be there or not)


def plan_load(seed: int, duration_s: float) -> list[PlannedSend]:
    """Every send of a campaign, in time order: from the seed and the duration only."""
    rng = random.Random(f"load:{seed}")
    sends: list[PlannedSend] = []
    t = 0.0
    while (t := t + rng.expovariate(STEADY_PER_S)) < duration_s:
        sends.append(PlannedSend(round(t, 3), IO_QUEUE, round(rng.uniform(*STEADY_S), 2)))
    t = rng.uniform(*BURST_EVERY_S) / 2
    while t < duration_s:
        for _ in range(rng.randint(*BURST_SIZE)):
            sends.append(PlannedSend(round(t, 3), IO_QUEUE, round(rng.uniform(*BURST_S), 2), True))
        t += rng.uniform(*BURST_EVERY_S)
    t = rng.uniform(*LONG_EVERY_S) / 2
    while t < duration_s:
        sends.append(PlannedSend(round(t, 3), SOLO_QUEUE, round(rng.uniform(*LONG_S), 2)))
        t += rng.uniform(*LONG_EVERY_S)
    return sorted(sends, key=lambda s: s.at_s)


@dataclass
class LoadGenerator:
    """Sends a plan from a thread; the nemesis sends its own tasks (OOM) through it too."""

    app: Any
    plan: list[PlannedSend]
    seed: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    sent: list[Sent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _n: int = 0

    def start(self, t0: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(t0,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def _run(self, t0: float) -> None:
        for planned in self.plan:
            if self._stop.wait(max(0.0, t0 + planned.at_s - time.time())):
                return
            kwargs = {"duration": planned.duration}
            self.send(WAIT_TASK, planned.queue, planned.duration, kwargs)

    def send(self, task: str, queue: str, duration: float, kwargs: dict[str, Any]) -> str:
        """Publish one task with a fresh id (also its effect key); record it whatever happens."""
        with self._lock:
            task_id = f"nem{self.seed}-{self.run}-{self._n:05d}"
            self._n += 1
            sent_at = time.time()
            try:
                self.app.send_task(
                    task, kwargs={**kwargs, "key": task_id}, task_id=task_id, queue=queue
                )
                confirmed = True
            except Exception:
                confirmed = False
            self.sent.append(Sent(task_id, queue, duration, sent_at, confirmed))
            return task_id

    def send_allocation(self, megabytes: int) -> str:
        """The OOM fault's task: allocates on its first delivery, runs light when redelivered."""
        return self.send(ALLOCATE_TASK, IO_QUEUE, 1.0, {"megabytes": megabytes, "hold_s": 1.0})
