"""A discrete-event simulation of the stack around the real decision core.

The point is to compare policies offline, so the one thing that must not be modelled is the
decision: every cycle builds ``scaler.observations.Observations`` from the simulated state, calls
the real ``scaler.decide.decide()`` and acts like the Compose backend would, then records the
count actually reached with ``History.record_action`` (as ``scaler.loop.Scaler.cycle`` does).

What is modelled, and why so (the backend's behaviour is docs/scaler-compose-backend.md):

- Tasks are published at the trace's times and taken FIFO per queue. With prefetch 1 a replica
  runs at most ``concurrency`` tasks, so in flight = running. A free slot is a consumer blocked on
  the broker; the broker serves the longest-waiting one first, so free slots form a FIFO queue
  (work spreads over the replicas, as it does for real, which is what makes idle replicas scarce).
- A scale-up adds replicas that count at once (the Compose backend counts running containers) and
  consume after ``startup_s``. A scale-down drains idle, ready replicas only, highest number first:
  a busy replica or a starting one (it answers no inspect) is never chosen; with too few idle ones
  the rest are kept and the count reached is what ``record_action`` gets. A draining replica is
  not a replica any more, but it costs until it is gone ``drain_s`` later.
- The warm pool (a service's ``warm``): warm replicas boot like cold ones (``startup_s``), then
  consume nothing and cost ``warm_seconds``, not replica-seconds. A scale-up takes booted warm
  replicas first (they consume after ``promote_s``: ``add_consumer``), then booting ones the
  pool would lose (serving from then on, consuming ``promote_s`` after their boot), then starts
  cold ones; a scale-down returns drained replicas to the pool (at once: they are idle) while it
  is short, and the pool is refilled or trimmed to the decision's ``warm`` after every decision.
- Event-driven detection (the policy's ``wakeup``), with the loop's arming rule
  (``scaler.arming.ring_level``, the same function): after each cycle a service is armed at a
  ring level or not at all; an arrival that leaves more than that many waiting on its queues
  wakes the scaler ``EVENT_LATENCY_S`` later (on a 1/256 s grid): at level 0 at most once per
  ``debounce_s`` per service, at a level once until the next cycle arms it again. After any
  cycle the next periodic one comes an interval later, as the real loop waits ``interval_s``
  after each cycle.
- Worker CPU is each service's running tasks' host share, averaged over the cycle, in percent of
  what its ready replicas may use (``cpu_limit_cores`` each); host CPU is the base plus every
  running task's share (or a schedule override). Durations do not stretch when the host is busy.

Cost: per task one arrival step, one start and one heap push/pop for its completion (O(log n));
per cycle one small Observations and one decide() call. Random draws come from streams seeded by
``seed`` per queue and per service, so a run is a pure function of its inputs.
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array
from collections import deque
from dataclasses import dataclass, field
from operator import itemgetter
from random import Random
from typing import Literal, NamedTuple

from scaler.arming import ring_level
from scaler.decide import decide
from scaler.history import History
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation
from scaler.policy import Policy, ServicePolicy
from scaler.simulate.distributions import Sampler
from scaler.simulate.model import Model, build_model
from scaler.simulate.trace import Trace

__all__ = [
    "Action",
    "DecisionRecord",
    "SimResult",
    "Step",
    "TaskLog",
    "default_horizon",
    "settle_time",
    "simulate",
]

STARTING, READY, DRAINING, GONE, WARMING, WARM, RELEASING, COMMITTED = 0, 1, 2, 3, 4, 5, 6, 7
_COMPLETE, _READY, _DRAINED, _WARMED = 0, 1, 2, 3
EVENT_LATENCY_S = 0.005  # publish to the scaler's woken decision (keyspace notification + wake)
INF = math.inf


class Step(NamedTuple):
    """One service at one cycle, as observed before deciding, plus what was decided."""

    t: float
    service: str
    replicas: int  # serving: ready + starting (what the backend reports)
    starting: int
    draining: int
    waiting: int
    in_flight: int
    oldest_age: float | None
    desired: int | None
    action: str
    warm: int = 0  # warm-pool replicas (booting or booted), beside the serving ones


class DecisionRecord(NamedTuple):
    """decide()'s output for one service at one cycle."""

    t: float
    service: str
    current: int | None
    desired: int | None
    action: str
    emergency: bool
    reasons: tuple[str, ...]
    recommended: int | None


class Action(NamedTuple):
    """A replica change the modelled backend carried out (what record_action was given)."""

    t: float
    service: str
    before: int
    after: int
    asked: int  # the desired count; after != asked when too few replicas were idle


@dataclass
class TaskLog:
    """Every task of one queue, indexed by task id (publish order, which is also start order)."""

    queue: str
    service: str
    publish: array
    start: array
    end: array  # nan while unfinished
    replica: array  # replica id the task ran on

    def latencies(self) -> list[float]:
        """Start minus publish for every started task (bench/burst_drain.py's latency)."""
        return [s - p for s, p in zip(self.start, self.publish, strict=False)]

    def completions(self) -> list[float]:
        """End minus publish for every finished task."""
        return [e - p for e, p in zip(self.end, self.publish, strict=True) if e == e]


@dataclass
class ReplicaLife:
    """One replica's life: when it was asked for, became ready, started draining, was gone."""

    service: str
    id: int
    created: float
    ready: float | None = None
    drain_start: float | None = None
    gone: float | None = None
    warm: bool = False  # started as a warm-pool replica


@dataclass
class SimResult:
    """Everything a run produced: per-cycle steps, decisions, actions, tasks, replica costs."""

    policy: Policy
    model: Model
    seed: int
    horizon_s: float  # the time the run stopped (the last cycle is at or before it)
    trace_duration_s: float
    first_arrival: float | None
    steps: list[Step]
    decisions: list[DecisionRecord]
    actions: list[Action]
    tasks: dict[str, TaskLog]
    replicas: list[ReplicaLife]
    replica_seconds: dict[str, float]  # starting, ready and draining replicas all cost
    warm_seconds: dict[str, float]  # warm-pool replicas: booting, waiting and being stopped
    peak_replicas: dict[str, int]
    cycles: int
    settle_s: float
    stats: dict[str, float] = field(default_factory=dict)

    def service_tasks(self, service: str) -> list[TaskLog]:
        return [log for log in self.tasks.values() if log.service == service]

    @property
    def published(self) -> int:
        return sum(len(log.publish) for log in self.tasks.values())

    @property
    def completed(self) -> int:
        return sum(1 for log in self.tasks.values() for e in log.end if e == e)


class _Replica:
    __slots__ = ("id", "life", "running", "state")

    def __init__(self, rid: int, life: ReplicaLife) -> None:
        self.id = rid
        self.state = STARTING
        self.running = 0
        self.life = life


class _Queue:
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

    def __init__(self, name: str, svc: _Svc, publish: array, cpu: float, draw: Sampler) -> None:
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


class _Svc:
    """One service's live state; counters kept incrementally so a cycle reads them in O(1)."""

    __slots__ = (
        "armed",
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
        "last_ring",
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
        "ring_above",
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
        self.replicas: list[_Replica] = []
        self.free: deque[_Replica] = deque()  # one entry per free slot, oldest first
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
        # wakeup: more waiting than this wakes the loop; None: not armed (set after each cycle)
        self.ring_above: int | None = None
        self.last_ring = -INF
        self.n_warming = self.n_warm = self.n_releasing = 0
        self.peak = 0
        self.draw_startup = m.startup_s.sampler(Random(f"{seed}:startup:{name}"))
        self.draw_drain = m.drain_s.sampler(Random(f"{seed}:drain:{name}"))
        self.draw_promote = m.promote_s.sampler(Random(f"{seed}:promote:{name}"))
        self.queues: list[_Queue] = []


WAKE_GRID = 256  # woken cycles fall on a 1/256 s grid (see _on_wake_grid)


def _on_wake_grid(t: float) -> float:
    """``t`` rounded up to a multiple of 1/256 s: binary-exact, so decision-clock readings
    (origin + t) and their differences carry no rounding whatever whole-second origin the
    clock has, and a window boundary falls the same way from any origin."""
    return math.ceil(t * WAKE_GRID) / WAKE_GRID


def settle_time(policy: Policy, model: Model) -> float:
    """Seconds after the last task ends for every service to be back at its floor, at worst.

    Per service: the down window (also the wait of a scaler that has just started), one down
    cooldown per down step from max to min, the scale-to-zero quiet period for a min-0 service,
    a slow start-up and drain (99.9th percentile), plus two cycles; the largest over services.
    """
    worst = 0.0
    for name, sp in policy.services.items():
        m = model.services[name]
        step = sp.scale_down.step_limit(max(sp.max_replicas, 1)) or sp.max_replicas
        steps = math.ceil((sp.max_replicas - sp.min_replicas) / max(step, 1))
        s = sp.scale_down.stabilization_s + sp.scale_down.cooldown_s * steps
        s += sp.scale_to_zero.idle_s if sp.min_replicas == 0 else 0.0
        s += m.startup_s.upper() + m.drain_s.upper() + sp.scale_up.cooldown_s
        worst = max(worst, s)
    return worst + 2 * policy.interval_s


def default_horizon(policy: Policy, model: Model, trace: Trace, last_completion: float) -> float:
    """max(trace end, last task completion) + settle_time: long enough to see the way back."""
    return max(trace.duration_s, last_completion) + settle_time(policy, model)


def simulate(
    policy: Policy,
    trace: Trace,
    model: Model | None = None,
    *,
    seed: int = 0,
    horizon_s: float | None = None,
    decisions: Literal["all", "changes", "none"] = "all",
    max_extra_s: float = 7 * 86400.0,
    clock_origin: float = 0.0,
) -> SimResult:
    """Run ``policy`` against ``trace`` on ``model`` (default: the stack's figures, overridden by
    the trace's ``model:`` section) and return what happened.

    ``horizon_s`` None: stop at max(trace end, last completion) + ``settle_time`` (while tasks
    remain, the run goes on up to ``max_extra_s`` past the trace's end). ``decisions`` keeps every
    decision ("all"), only non-hold or emergency ones ("changes"), or none. ``clock_origin`` is
    the decision clock's reading at t = 0 (the running scaler's monotonic clock starts anywhere):
    decisions must not depend on it, which the time-domain property tests check.
    """
    trace.check_queues(policy)
    if model is None:
        model = build_model(policy, trace.model)
    interval = policy.interval_s
    settle = settle_time(policy, model)
    arrivals = trace.arrivals(seed)

    svcs: list[_Svc] = []
    queues: dict[str, _Queue] = {}
    for name, sp in policy.services.items():
        s = _Svc(name, sp, model, seed)
        for qname in sp.queues:
            rows = arrivals.get(qname, [])
            if all(n == 1 for _, n in rows):
                times = array("d", [t for t, _ in rows])
            else:
                times = array("d")
                for t, n in rows:
                    times.extend(itertools.repeat(t, n))
            qm = model.queues[qname]
            q = _Queue(
                qname,
                s,
                times,
                qm.cpu_percent_per_task,
                qm.duration_s.sampler(Random(f"{seed}:duration:{qname}")),
            )
            s.queues.append(q)
            queues[qname] = q
        svcs.append(s)

    # All arrivals in one time-ordered stream: (t, count, queue).
    stream = [(t, n, queues[qn]) for qn, rows in arrivals.items() for t, n in rows]
    stream.sort(key=itemgetter(0))
    total_tasks = sum(q.total for q in queues.values())
    done_tasks = 0
    last_completion = 0.0

    heap: list[tuple] = []
    seq = itertools.count()
    lives: list[ReplicaLife] = []
    steps: list[Step] = []
    records: list[DecisionRecord] = []
    actions: list[Action] = []
    push, pop = heapq.heappush, heapq.heappop

    def rs_update(s: _Svc, now: float) -> None:
        dt = now - s.rs_t
        s.rs_int += (s.n_ready + s.n_starting + s.n_draining) * dt
        s.ws_int += (s.n_warming + s.n_warm + s.n_releasing) * dt
        s.rs_t = now

    def add_warm(s: _Svc, now: float) -> None:
        rs_update(s, now)
        life = ReplicaLife(s.name, s.next_id, now, warm=True)
        lives.append(life)
        r = _Replica(s.next_id, life)
        r.state = WARMING
        s.next_id += 1
        s.replicas.append(r)
        s.n_warming += 1
        push(heap, (now + s.draw_startup(), next(seq), _WARMED, s, r, 0))

    def commit(s: _Svc, r: _Replica, now: float) -> None:
        """A booting warm replica the pool would lose, taken as serving (WarmPool.commit):
        starting from now, consuming ``promote_s`` after its boot ends."""
        rs_update(s, now)
        r.state = COMMITTED
        s.n_warming -= 1
        s.n_starting += 1
        s.peak = max(s.peak, s.n_ready + s.n_starting)

    def promote(s: _Svc, r: _Replica, now: float) -> None:
        """A booted warm replica starts consuming (add_consumer): serving, ready shortly."""
        rs_update(s, now)
        r.state = STARTING
        s.n_warm -= 1
        s.n_starting += 1
        push(heap, (now + s.draw_promote(), next(seq), _READY, s, r, 0))
        s.peak = max(s.peak, s.n_ready + s.n_starting)

    def to_pool(s: _Svc, r: _Replica, now: float) -> None:
        """A drained (idle) replica kept as a warm one instead of being stopped."""
        rs_update(s, now)
        r.state = WARM
        s.n_ready -= 1
        s.n_warm += 1
        s.slots -= s.concurrency
        s.free = deque(x for x in s.free if x is not r)  # its slots are gone, not stale

    def release(s: _Svc, r: _Replica, now: float) -> None:
        """A warm (or warming) replica stopped: it costs until it is gone."""
        rs_update(s, now)
        if r.state == WARM:
            s.n_warm -= 1
        else:
            s.n_warming -= 1
        r.state = RELEASING
        r.life.drain_start = now
        s.n_releasing += 1
        push(heap, (now + s.draw_drain(), next(seq), _DRAINED, s, r, 0))

    def add_replica(s: _Svc, now: float, ready_now: bool) -> None:
        rs_update(s, now)
        life = ReplicaLife(s.name, s.next_id, now)
        lives.append(life)
        r = _Replica(s.next_id, life)
        s.next_id += 1
        s.replicas.append(r)
        s.n_starting += 1
        if ready_now:
            make_ready(s, r, now)
        else:
            push(heap, (now + s.draw_startup(), next(seq), _READY, s, r, 0))
        s.peak = max(s.peak, s.n_ready + s.n_starting)

    def start_task(s: _Svc, q: _Queue, r: _Replica, now: float) -> None:
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
        push(heap, (now + q.draw(), next(seq), _COMPLETE, q, r, tid))

    def head(s: _Svc) -> _Queue | None:
        """The queue whose oldest waiting task is oldest (one queue: that queue if it waits)."""
        best: _Queue | None = None
        for q in s.queues:
            if q.next_pub > q.next_start and (
                best is None or q.publish[q.next_start] < best.publish[best.next_start]
            ):
                best = q
        return best

    def make_ready(s: _Svc, r: _Replica, now: float) -> None:
        r.state = READY
        if r.life.ready is None:  # a warm replica was ready (booted) before it was promoted
            r.life.ready = now
        s.n_starting -= 1
        s.n_ready += 1
        for _ in range(s.concurrency):
            q = head(s)
            if q is None:
                s.free.append(r)
                s.slots += 1
            else:
                start_task(s, q, r, now)

    # Start: every service at its minimum, warm (the stack before the trace begins).
    for s in svcs:
        for _ in range(s.sp.min_replicas):
            add_replica(s, 0.0, ready_now=True)

    history = History()
    host_sched = list(model.host.host_cpu)
    sched_i, sched_val = 0, None
    base_cpu, host_mem = model.host.base_cpu_percent, model.host.memory_percent
    keep = decisions
    cap = trace.duration_s + max_extra_s
    end_at = horizon_s if horizon_s is not None else cap
    settled_end: float | None = None
    if horizon_s is None and total_tasks == 0:
        settled_end = default_horizon(policy, model, trace, 0.0)
        end_at = settled_end

    n_stream = len(stream)
    ai = 0
    t_arr = stream[0][0] if n_stream else INF
    t_cycle = 0.0
    cycles = 0
    last_cycle_t = 0.0
    # Periodic cycles on a grid from the last woken cycle (from 0 when nothing woke the loop).
    grid_origin, grid_k = 0.0, 0
    t_wake = INF
    events = policy.wakeup.events
    debounce = policy.wakeup.debounce_s
    woken = 0

    while True:
        t_ev = heap[0][0] if heap else INF
        if t_ev <= t_arr and t_ev <= t_cycle:
            if t_ev > end_at:
                break
            now, _, kind, a, r, tid = pop(heap)
            if kind == _COMPLETE:
                q = a
                s = q.svc
                q.end[tid] = now
                q.done += 1
                done_tasks += 1
                s.cpu_int += s.cpu_load * (now - s.cpu_t)
                s.cpu_t = now
                s.cpu_load -= q.cpu
                if r.state == READY:
                    nq = q if (len(s.queues) == 1 and q.next_pub > q.next_start) else head(s)
                    if nq is not None:
                        r.running -= 1
                        if r.running == 0:
                            s.busy -= 1
                        start_task(s, nq, r, now)
                    else:
                        r.running -= 1
                        if r.running == 0:
                            s.busy -= 1
                        s.free.append(r)
                        s.slots += 1
                else:  # a draining replica finishes its task (not reached: only idle drain)
                    r.running -= 1
                    if r.running == 0 and r.state == DRAINING:
                        push(heap, (now + s.draw_drain(), next(seq), _DRAINED, s, r, 0))
                if done_tasks == total_tasks and horizon_s is None:
                    last_completion = now
                    settled_end = default_horizon(policy, model, trace, now)
                    end_at = settled_end
            elif kind == _READY:
                make_ready(a, r, now)
            elif kind == _WARMED:
                s = a
                if r.state == WARMING:
                    rs_update(s, now)
                    r.state = WARM
                    r.life.ready = now
                    s.n_warming -= 1
                    s.n_warm += 1
                elif r.state == COMMITTED:  # booted: its consumers added, then ready
                    r.state = STARTING
                    push(heap, (now + s.draw_promote(), next(seq), _READY, s, r, 0))
            else:  # drained or released: gone
                s = a
                rs_update(s, now)
                if r.state == RELEASING:
                    s.n_releasing -= 1
                else:
                    s.n_draining -= 1
                r.state = GONE
                r.life.gone = now
                s.replicas.remove(r)
        elif t_arr <= t_cycle:
            if t_arr > end_at:
                break
            now, n, q = stream[ai]
            ai += 1
            t_arr = stream[ai][0] if ai < n_stream else INF
            q.next_pub += n
            s = q.svc
            if s.slots:
                free = s.free
                while s.slots and q.next_pub > q.next_start:
                    r = free.popleft()
                    if r.state == READY:
                        s.slots -= 1
                        start_task(s, q, r, now)
            level = s.ring_above
            if level is not None and q.next_pub > q.next_start and t_wake == INF:
                if level == 0:
                    # A new backlog on an idle service: wake the loop, once per debounce window.
                    t_wake = _on_wake_grid(max(now + EVENT_LATENCY_S, s.last_ring + debounce))
                    s.last_ring = t_wake
                    t_cycle = min(t_cycle, t_wake)
                elif sum(x.next_pub - x.next_start for x in s.queues) > level:
                    # A held backlog grown to its level: wake once, until the next arming.
                    t_wake = _on_wake_grid(now + EVENT_LATENCY_S)
                    s.ring_above = None
                    t_cycle = min(t_cycle, t_wake)
        else:
            now = t_cycle
            if now > end_at:
                break
            cycles += 1
            if now == t_wake and now < grid_origin + grid_k * interval:
                woken += 1
                grid_origin, grid_k = now, 1
            else:
                grid_k += 1
            t_wake = INF
            t_cycle = grid_origin + grid_k * interval
            # Host CPU schedule override.
            while sched_i < len(host_sched) and host_sched[sched_i][0] <= now:
                sched_val = host_sched[sched_i][1]
                sched_i += 1
            clock = clock_origin + now  # the decision clock: the scaler's monotonic reading
            window = now - last_cycle_t
            last_cycle_t = now
            host_load = 0.0
            services: dict[str, ServiceObservation] = {}
            seen: list[tuple[_Svc, int, int, int, float | None]] = []
            for s in svcs:
                s.cpu_int += s.cpu_load * (now - s.cpu_t)
                s.cpu_t = now
                mean_load = (s.cpu_int - s.cpu_last_int) / window if window > 0 else s.cpu_load
                s.cpu_last_int = s.cpu_int
                host_load += mean_load
                if s.n_ready:
                    cpu: float | None = min(100.0, mean_load * s.cpu_scale / s.n_ready)
                    mem: float | None = s.mem
                else:
                    cpu = mem = None
                signals = {}
                w = f = 0
                age_max: float | None = None
                for q in s.queues:
                    waiting = q.next_pub - q.next_start
                    age = now - q.publish[q.next_start] if waiting else None
                    in_flight = q.next_start - q.done
                    signals[q.name] = QueueSignal(q.name, waiting, in_flight, age, clock)
                    w += waiting
                    f += in_flight
                    if age is not None and (age_max is None or age > age_max):
                        age_max = age
                serving = s.n_ready + s.n_starting
                services[s.name] = ServiceObservation(
                    s.name, serving, signals, Resources(cpu, mem, clock), s.busy,
                    s.n_warm + s.n_warming,
                )  # fmt: skip
                seen.append((s, serving, w, f, age_max))
            host_cpu = min(100.0, base_cpu + host_load) if sched_val is None else sched_val
            obs = Observations(clock, services, Resources(host_cpu, host_mem, clock))
            decided, history = decide(policy, obs, history, clock)
            for s, serving, w, f, age_max in seen:
                d = decided[s.name]
                s.ring_above = ring_level(s.sp, d, serving, w, f) if events else None
                steps.append(
                    Step(
                        now,
                        s.name,
                        serving,
                        s.n_starting,
                        s.n_draining,
                        w,
                        f,
                        age_max,
                        d.desired,
                        d.action,
                        s.n_warm + s.n_warming,
                    )
                )
                if keep == "all" or (keep == "changes" and (d.action != "hold" or d.emergency)):
                    records.append(
                        DecisionRecord(
                            now,
                            s.name,
                            d.current,
                            d.desired,
                            d.action,
                            d.emergency,
                            d.reasons,
                            d.recommended,
                        )
                    )
                if d.desired is None:
                    continue
                before = s.n_ready + s.n_starting
                if d.action == "hold":
                    pass
                elif d.desired > before:
                    need = d.desired - before
                    if s.n_warm:  # the pool first: booted, consuming after add_consumer
                        for r in [r for r in s.replicas if r.state == WARM][:need]:
                            promote(s, r, now)
                            need -= 1
                    excess = s.n_warm + s.n_warming - d.warm
                    if need and excess > 0 and s.n_warming:  # booting ones the pool would lose
                        booting = [r for r in s.replicas if r.state == WARMING]
                        for r in booting[: min(need, excess)]:
                            commit(s, r, now)
                            need -= 1
                    for _ in range(need):
                        add_replica(s, now, ready_now=False)
                else:
                    idle = [r for r in s.replicas if r.state == READY and r.running == 0]
                    idle.sort(key=lambda r: -r.id)
                    rs_update(s, now)
                    for r in idle[: before - d.desired]:
                        if s.n_warm + s.n_warming < d.warm:  # back to the pool, not stopped
                            to_pool(s, r, now)
                            continue
                        r.state = DRAINING
                        r.life.drain_start = now
                        s.n_ready -= 1
                        s.n_draining += 1
                        s.slots -= s.concurrency
                        push(heap, (now + s.draw_drain(), next(seq), _DRAINED, s, r, 0))
                after = s.n_ready + s.n_starting
                if after != before:
                    history = history.record_action(s.name, before, after, clock)
                    actions.append(Action(now, s.name, before, after, d.desired))
                pool = s.n_warm + s.n_warming
                # Replicas a scale-down could not remove (busy) take the pool's room: serving +
                # warm stays within what the decision asked (within max), as the backends keep it.
                want = max(0, d.warm - max(0, after - d.desired))
                if pool < want:
                    for _ in range(want - pool):
                        add_warm(s, now)
                elif pool > want:  # trim: the ones still booting first
                    extra = sorted(
                        (r for r in s.replicas if r.state in (WARMING, WARM)),
                        key=lambda r: (r.state != WARMING, -r.id),
                    )
                    for r in extra[: pool - want]:
                        release(s, r, now)
            if horizon_s is None and settled_end is None and now >= cap:
                break

    stop = min(end_at, last_cycle_t) if horizon_s is None else horizon_s
    rs: dict[str, float] = {}
    ws: dict[str, float] = {}
    for s in svcs:
        rs_update(s, stop)
        rs[s.name] = s.rs_int
        ws[s.name] = s.ws_int
    tasks = {
        q.name: TaskLog(
            q.name, q.svc.name, q.publish[: q.next_pub], q.start, q.end[: q.next_pub], q.replica
        )
        for q in queues.values()
    }
    return SimResult(
        policy=policy,
        model=model,
        seed=seed,
        horizon_s=stop,
        trace_duration_s=trace.duration_s,
        first_arrival=stream[0][0] if stream else None,
        steps=steps,
        decisions=records,
        actions=actions,
        tasks=tasks,
        replicas=lives,
        replica_seconds=rs,
        warm_seconds=ws,
        peak_replicas={s.name: s.peak for s in svcs},
        cycles=cycles,
        settle_s=settle,
        stats={
            "tasks_total": float(total_tasks),
            "tasks_done": float(done_tasks),
            "last_completion": last_completion,
            "woken_cycles": float(woken),
        },
    )
