"""The modelled backend: replicas of each service, the tasks they run, and how a scale acts.

This is the part of the simulation that stands in for real workers, so it models them (the
rules are in ``scaler.simulate.engine``'s docstring) but decides nothing the real backends decide
differently: which replica a scale-down removes (``scaler.backends.removal.removal_order``) and
the warm pool's plan (``scaler.backends.warm_pool``: commits, room, target, trim order) are the
backends' own functions.

Time moves forward through one heap of timed events (a task's completion, a replica ready, a
warm one booted, a drained or released one gone); the engine pops them in order and hands each
to ``Cluster.handle``. Counters per service are kept incrementally so that a cycle reads them in
O(1), and a task costs one heap push and pop.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections import deque
from heapq import heappush
from random import Random
from typing import Any

from scaler.backends.removal import removal_order
from scaler.backends.warm_pool import commit_count, pool_room, pool_target, trim_order
from scaler.policy import ServicePolicy
from scaler.simulate.distributions import Sampler
from scaler.simulate.model import Model
from scaler.simulate.records import ReplicaLife

__all__ = ["COMPLETE", "Cluster", "SimQueue", "SimService"]

# Replica states.
STARTING, READY, DRAINING, GONE, WARMING, WARM, RELEASING, COMMITTED = 0, 1, 2, 3, 4, 5, 6, 7
# Timed event kinds on the heap.
COMPLETE, BECOME_READY, GONE_EVENT, WARMED = 0, 1, 2, 3
INF = math.inf


class Replica:
    __slots__ = ("id", "life", "running", "state")

    def __init__(self, rid: int, life: ReplicaLife) -> None:
        self.id = rid
        self.state = STARTING
        self.running = 0
        self.life = life


def _running(r: Replica) -> int:
    return r.running


def _rid(r: Replica) -> int:
    return r.id


def _booted(r: Replica) -> bool:
    return r.state != WARMING


class SimQueue:
    """One queue's tasks: published, started and finished so far (ids in publish order)."""

    __slots__ = (
        "cpu",
        "done",
        "draw",
        "end",
        "name",
        "next_pub",
        "next_start",
        "publish",
        "replica",
        "start",
        "svc",
        "total",
    )

    def __init__(
        self, name: str, svc: SimService, publish: array, cpu: float, draw: Sampler
    ) -> None:
        self.name = name
        self.svc = svc
        self.publish = publish
        self.total = len(publish)
        self.next_pub = 0  # tasks published so far (ids below this)
        self.next_start = 0  # tasks started so far; waiting = next_pub - next_start
        self.done = 0
        self.start: array = array("d")
        self.replica: array = array("l")
        self.end: array = array("d", [math.nan]) * self.total
        self.cpu = cpu
        self.draw = draw


class SimService:
    """One service's live state; counters kept incrementally so a cycle reads them in O(1)."""

    __slots__ = (
        "busy",
        "concurrency",
        "cpu_int",
        "cpu_last_int",
        "cpu_load",
        "cpu_scale",
        "cpu_t",
        "draw_drain",
        "draw_promote",
        "draw_startup",
        "free",
        "mem",
        "n_draining",
        "n_ready",
        "n_releasing",
        "n_starting",
        "n_warm",
        "n_warming",
        "name",
        "next_id",
        "peak",
        "queues",
        "replicas",
        "rs_int",
        "rs_t",
        "slots",
        "sp",
        "ws_int",
    )

    def __init__(self, name: str, sp: ServicePolicy, model: Model, seed: int) -> None:
        m = model.services[name]
        self.name = name
        self.sp = sp
        self.concurrency = m.concurrency
        self.replicas: list[Replica] = []
        self.free: deque[Replica] = deque()  # one entry per free slot, oldest first
        self.slots = 0  # free slots on ready replicas (stale deque entries are skipped)
        self.n_starting = self.n_ready = self.n_draining = 0
        self.busy = 0  # ready replicas running at least one task
        self.next_id = 0
        self.cpu_load = 0.0  # host CPU share of the running tasks, percent
        self.cpu_int = self.cpu_last_int = self.cpu_t = 0.0
        self.cpu_scale = model.host.cpu_cores / m.cpu_limit_cores  # host share -> replica %
        self.mem = m.memory_percent
        self.rs_int = self.rs_t = 0.0
        self.ws_int = 0.0
        self.n_warming = self.n_warm = self.n_releasing = 0
        self.peak = 0
        self.draw_startup = m.startup_s.sampler(Random(f"{seed}:startup:{name}"))
        self.draw_drain = m.drain_s.sampler(Random(f"{seed}:drain:{name}"))
        self.draw_promote = m.promote_s.sampler(Random(f"{seed}:promote:{name}"))
        self.queues: list[SimQueue] = []

    @property
    def serving(self) -> int:
        """Ready plus starting: what the backend reports as the service's replicas."""
        return self.n_ready + self.n_starting

    @property
    def pool(self) -> int:
        """Warm-pool members, booting or booted."""
        return self.n_warm + self.n_warming

    def waiting(self) -> int:
        """Messages waiting on the service's queues now (asked at every armed arrival)."""
        queues = self.queues
        if len(queues) == 1:
            q = queues[0]
            return q.next_pub - q.next_start
        return sum(q.next_pub - q.next_start for q in queues)

    def account(self, now: float) -> None:
        """Integrate replica-seconds and warm-seconds up to ``now`` (before any count changes)."""
        dt = now - self.rs_t
        self.rs_int += (self.n_ready + self.n_starting + self.n_draining) * dt
        self.ws_int += (self.n_warming + self.n_warm + self.n_releasing) * dt
        self.rs_t = now

    def cpu_to(self, now: float) -> None:
        """Integrate the running tasks' CPU share up to ``now``."""
        self.cpu_int += self.cpu_load * (now - self.cpu_t)
        self.cpu_t = now

    def head(self) -> SimQueue | None:
        """The queue whose oldest waiting task is oldest (one queue: that queue if it waits)."""
        best: SimQueue | None = None
        for q in self.queues:
            if q.next_pub > q.next_start and (
                best is None or q.publish[q.next_start] < best.publish[best.next_start]
            ):
                best = q
        return best


class Cluster:
    """Every service's replicas and the timed events that move them (the modelled backend)."""

    def __init__(self) -> None:
        self.heap: list[tuple] = []
        self._seq = itertools.count()
        self.lives: list[ReplicaLife] = []
        self.total_done = 0

    def _at(self, t: float, kind: int, a: SimService, r: Replica, tid: int = 0) -> None:
        heappush(self.heap, (t, next(self._seq), kind, a, r, tid))

    # -- tasks ---------------------------------------------------------------------------------
    def start_task(self, s: SimService, q: SimQueue, r: Replica, now: float) -> None:
        tid = q.next_start
        q.next_start = tid + 1
        q.start.append(now)
        q.replica.append(r.id)
        if r.running == 0:
            s.busy += 1
        r.running += 1
        s.cpu_int += s.cpu_load * (now - s.cpu_t)
        s.cpu_t = now
        s.cpu_load += q.cpu
        heappush(self.heap, (now + q.draw(), next(self._seq), COMPLETE, q, r, tid))

    def publish(self, q: SimQueue, n: int, now: float) -> None:
        """``n`` tasks land on ``q``; free slots (longest waiting first) take them at once."""
        q.next_pub += n
        s = q.svc
        if s.slots:
            free = s.free
            while s.slots and q.next_pub > q.next_start:
                r = free.popleft()
                if r.state == READY:
                    s.slots -= 1
                    self.start_task(s, q, r, now)

    def complete(self, q: SimQueue, r: Replica, tid: int, now: float) -> None:
        """Task ``tid`` of ``q`` ends on ``r``: the replica takes the next waiting task."""
        s = q.svc
        q.end[tid] = now
        q.done += 1
        self.total_done += 1
        s.cpu_int += s.cpu_load * (now - s.cpu_t)
        s.cpu_t = now
        s.cpu_load -= q.cpu
        if r.state == READY:
            nq = q if (len(s.queues) == 1 and q.next_pub > q.next_start) else s.head()
            r.running -= 1
            if r.running == 0:
                s.busy -= 1
            if nq is not None:
                self.start_task(s, nq, r, now)
            else:
                s.free.append(r)
                s.slots += 1
        else:  # a draining replica finishes its task (not reached: only idle drain)
            r.running -= 1
            if r.running == 0 and r.state == DRAINING:
                self._at(now + s.draw_drain(), GONE_EVENT, s, r)

    def handle(self, now: float, kind: int, a: Any, r: Replica, tid: int) -> None:
        """One timed event popped off the heap (``a``: the task's queue, else the service)."""
        if kind == COMPLETE:
            self.complete(a, r, tid, now)
        elif kind == BECOME_READY:
            self._make_ready(a, r, now)
        elif kind == WARMED:
            self._warmed(a, r, now)
        else:
            self._gone(a, r, now)

    # -- replica lives -------------------------------------------------------------------------
    def _new(self, s: SimService, now: float, warm: bool) -> Replica:
        s.account(now)
        life = ReplicaLife(s.name, s.next_id, now, warm=warm)
        self.lives.append(life)
        r = Replica(s.next_id, life)
        s.next_id += 1
        s.replicas.append(r)
        return r

    def add_replica(self, s: SimService, now: float, ready_now: bool) -> None:
        """A cold replica: counted at once, consuming once started (or at once, at t = 0)."""
        r = self._new(s, now, warm=False)
        s.n_starting += 1
        if ready_now:
            self._make_ready(s, r, now)
        else:
            self._at(now + s.draw_startup(), BECOME_READY, s, r)
        s.peak = max(s.peak, s.n_ready + s.n_starting)

    def _make_ready(self, s: SimService, r: Replica, now: float) -> None:
        r.state = READY
        if r.life.ready is None:  # a warm replica was ready (booted) before it was promoted
            r.life.ready = now
        s.n_starting -= 1
        s.n_ready += 1
        for _ in range(s.concurrency):
            q = s.head()
            if q is None:
                s.free.append(r)
                s.slots += 1
            else:
                self.start_task(s, q, r, now)

    def _add_warm(self, s: SimService, now: float) -> None:
        r = self._new(s, now, warm=True)
        r.state = WARMING
        s.n_warming += 1
        self._at(now + s.draw_startup(), WARMED, s, r)

    def _warmed(self, s: SimService, r: Replica, now: float) -> None:
        if r.state == WARMING:
            s.account(now)
            r.state = WARM
            r.life.ready = now
            s.n_warming -= 1
            s.n_warm += 1
        elif r.state == COMMITTED:  # booted: its consumers added, then ready
            r.state = STARTING
            self._at(now + s.draw_promote(), BECOME_READY, s, r)

    def _commit(self, s: SimService, r: Replica, now: float) -> None:
        """A booting warm replica the pool would lose, taken as serving (WarmPool.commit):
        starting from now, consuming ``promote_s`` after its boot ends."""
        s.account(now)
        r.state = COMMITTED
        s.n_warming -= 1
        s.n_starting += 1
        s.peak = max(s.peak, s.n_ready + s.n_starting)

    def _promote(self, s: SimService, r: Replica, now: float) -> None:
        """A booted warm replica starts consuming (add_consumer): serving, ready shortly."""
        s.account(now)
        r.state = STARTING
        s.n_warm -= 1
        s.n_starting += 1
        self._at(now + s.draw_promote(), BECOME_READY, s, r)
        s.peak = max(s.peak, s.n_ready + s.n_starting)

    def _to_pool(self, s: SimService, r: Replica, now: float) -> None:
        """A drained (idle) replica kept as a warm one instead of being stopped."""
        s.account(now)
        r.state = WARM
        s.n_ready -= 1
        s.n_warm += 1
        s.slots -= s.concurrency
        s.free = deque(x for x in s.free if x is not r)  # its slots are gone, not stale

    def _drain(self, s: SimService, r: Replica, now: float) -> None:
        """An idle ready replica stops consuming and is gone ``drain_s`` later."""
        r.state = DRAINING
        r.life.drain_start = now
        s.n_ready -= 1
        s.n_draining += 1
        s.slots -= s.concurrency
        self._at(now + s.draw_drain(), GONE_EVENT, s, r)

    def _release(self, s: SimService, r: Replica, now: float) -> None:
        """A warm (or warming) replica stopped: it costs until it is gone."""
        s.account(now)
        if r.state == WARM:
            s.n_warm -= 1
        else:
            s.n_warming -= 1
        r.state = RELEASING
        r.life.drain_start = now
        s.n_releasing += 1
        self._at(now + s.draw_drain(), GONE_EVENT, s, r)

    def _gone(self, s: SimService, r: Replica, now: float) -> None:
        s.account(now)
        if r.state == RELEASING:
            s.n_releasing -= 1
        else:
            s.n_draining -= 1
        r.state = GONE
        r.life.gone = now
        s.replicas.remove(r)

    # -- a scale, as the backends act on a decision -------------------------------------------
    def scale(self, s: SimService, desired: int, warm: int, now: float, hold: bool) -> None:
        """Act on a decision for ``desired`` serving replicas and ``warm`` pool members: promote
        booted members, commit booting ones the pool would lose, then start cold ones; or drain
        idle replicas (back to the pool while it is short); then size the pool (also on a
        ``hold``, which changes no serving count)."""
        before = s.n_ready + s.n_starting
        if hold:
            pass
        elif desired > before:
            self._scale_up(s, desired - before, warm, now)
        elif desired < before:
            self._scale_down(s, before - desired, warm, now)
        want = pool_target(warm, s.n_ready + s.n_starting, desired)
        if s.n_warm + s.n_warming != want:
            self._size_pool(s, want, now)

    def _scale_up(self, s: SimService, need: int, warm: int, now: float) -> None:
        if s.n_warm:  # the pool first: booted, consuming after add_consumer
            for r in [r for r in s.replicas if r.state == WARM][:need]:
                self._promote(s, r, now)
                need -= 1
        if need and s.n_warming:  # booting ones the pool would lose
            booting = [r for r in s.replicas if r.state == WARMING]
            for r in booting[: commit_count(need, len(booting), s.n_warm + s.n_warming, warm)]:
                self._commit(s, r, now)
                need -= 1
        for _ in range(need):
            self.add_replica(s, now, ready_now=False)

    def _scale_down(self, s: SimService, count: int, warm: int, now: float) -> None:
        # Idle, ready replicas only: a busy one (the Compose backend drains idle ones only) or a
        # starting one (it answers no inspect) is kept, and the count reached says so.
        ranked = removal_order((r for r in s.replicas if r.state == READY), _running, _rid)
        chosen = [r for r in ranked[:count] if r.running == 0]
        room = pool_room(warm, s.n_warm + s.n_warming)
        s.account(now)
        for r in chosen[:room]:
            self._to_pool(s, r, now)
        for r in chosen[room:]:
            self._drain(s, r, now)

    def _size_pool(self, s: SimService, want: int, now: float) -> None:
        """Refill the pool with replicas started warm, or stop the excess (booting ones first)."""
        pool = s.n_warm + s.n_warming
        if pool < want:
            for _ in range(want - pool):
                self._add_warm(s, now)
        elif pool > want:
            members = [r for r in s.replicas if r.state in (WARMING, WARM)]
            for r in trim_order(members, _booted, _rid)[: pool - want]:
                self._release(s, r, now)
