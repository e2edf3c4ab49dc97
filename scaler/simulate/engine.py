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
- Event-driven detection (the policy's ``wakeup``) runs the loop's own pieces
  (``scaler.simulate.wakeups``): the arming rule ``scaler.arming.ring_level`` after each cycle and
  ``scaler.wakeup.Debouncer`` on the arrivals, clocked by the simulation; a ring wakes the scaler
  ``EVENT_LATENCY_S`` after the publish (on a 1/256 s grid). After any cycle the next periodic
  one comes an interval later, as the real loop waits ``interval_s`` after each cycle.
- Worker CPU is each service's running tasks' host share, averaged over the cycle, in percent of
  what its ready replicas may use (``cpu_limit_cores`` each); host CPU is the base plus every
  running task's share (or a schedule override). Durations do not stretch when the host is busy.

Layout: ``records`` (what a run produced), ``cluster`` (the modelled backend: replicas, tasks,
how a scale acts, with the backends' own removal order and warm-pool plan), ``wakeups`` (the
detection), and here the event loop and the cycle (observe, decide, arm, act, record).

Cost: per task one arrival step, one start and one heap push/pop for its completion (O(log n));
per cycle one small Observations and one decide() call. Random draws come from streams seeded by
``seed`` per queue and per service, so a run is a pure function of its inputs.
"""

from __future__ import annotations

import itertools
import math
from array import array
from heapq import heappop
from operator import itemgetter
from random import Random
from typing import Literal

from scaler.decide import decide, queue_totals
from scaler.history import History
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation
from scaler.policy import Policy
from scaler.simulate.cluster import COMPLETE, Cluster, SimQueue, SimService
from scaler.simulate.model import Model, build_model
from scaler.simulate.records import (
    Action,
    DecisionRecord,
    ReplicaLife,
    SimResult,
    Step,
    TaskLog,
)
from scaler.simulate.trace import Trace
from scaler.simulate.wakeups import EVENT_LATENCY_S, Detection

__all__ = [
    "EVENT_LATENCY_S",
    "Action",
    "DecisionRecord",
    "ReplicaLife",
    "SimResult",
    "Step",
    "TaskLog",
    "default_horizon",
    "settle_time",
    "simulate",
]

INF = math.inf
Keep = Literal["all", "changes", "none"]


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
    decisions: Keep = "all",
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
    return _Run(policy, trace, model, seed, horizon_s, decisions, max_extra_s, clock_origin).run()


def _services(
    policy: Policy, model: Model, arrivals: dict[str, list[tuple[float, int]]], seed: int
) -> tuple[dict[str, SimService], dict[str, SimQueue]]:
    """Every service and queue of the policy, each queue holding its publish times."""
    svcs: dict[str, SimService] = {}
    queues: dict[str, SimQueue] = {}
    for name, sp in policy.services.items():
        s = SimService(name, sp, model, seed)
        for qname in sp.queues:
            rows = arrivals.get(qname, [])
            if all(n == 1 for _, n in rows):
                times = array("d", [t for t, _ in rows])
            else:
                times = array("d")
                for t, n in rows:
                    times.extend(itertools.repeat(t, n))
            qm = model.queues[qname]
            draw = qm.duration_s.sampler(Random(f"{seed}:duration:{qname}"))
            q = SimQueue(qname, s, times, qm.cpu_percent_per_task, draw)
            s.queues.append(q)
            queues[qname] = q
        svcs[name] = s
    return svcs, queues


class _CycleClock:
    """When the loop decides: periodic cycles on a grid from the last woken cycle (from 0 when
    nothing woke it), as the real loop waits ``interval_s`` after every cycle."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.origin, self.k = 0.0, 0
        self.next = 0.0
        self.woken = 0
        self.last = 0.0  # the previous cycle's time

    def tick(self, now: float, wake: float) -> float:
        """A cycle runs at ``now`` (woken when ``now`` is the ring's time, before the periodic
        one); the next periodic one is scheduled. Returns the window since the last cycle."""
        if now == wake and now < self.origin + self.k * self.interval:
            self.woken += 1
            self.origin, self.k = now, 1
        else:
            self.k += 1
        self.next = self.origin + self.k * self.interval
        window, self.last = now - self.last, now
        return window


class _Run:
    """One simulation: the event loop over completions, arrivals, trailing rings and cycles."""

    def __init__(
        self,
        policy: Policy,
        trace: Trace,
        model: Model,
        seed: int,
        horizon_s: float | None,
        keep: Keep,
        max_extra_s: float,
        clock_origin: float,
    ) -> None:
        self.policy, self.trace, self.model, self.seed = policy, trace, model, seed
        self.horizon_s, self.keep, self.clock_origin = horizon_s, keep, clock_origin
        arrivals = trace.arrivals(seed)
        self.svcs, self.queues = _services(policy, model, arrivals, seed)
        # All arrivals in one time-ordered stream: (t, count, queue).
        self.stream = [(t, n, self.queues[qn]) for qn, rows in arrivals.items() for t, n in rows]
        self.stream.sort(key=itemgetter(0))
        self.total_tasks = sum(q.total for q in self.queues.values())
        self.cluster = Cluster()
        self.detection = Detection(policy, self.svcs)
        self.cycles = _CycleClock(policy.interval_s)
        self.history = History()
        self.steps: list[Step] = []
        self.records: list[DecisionRecord] = []
        self.actions: list[Action] = []
        self.host_sched = list(model.host.host_cpu)
        self.sched_i = 0
        self.sched_val: float | None = None
        self.n_cycles = 0
        self.last_completion = 0.0
        # When to stop: the horizon, else once settled after the last task (capped).
        self.cap = trace.duration_s + max_extra_s
        self.end_at = horizon_s if horizon_s is not None else self.cap
        self.settled_end: float | None = None
        if horizon_s is None and self.total_tasks == 0:
            self.settled_end = default_horizon(policy, model, trace, 0.0)
            self.end_at = self.settled_end
        # Start: every service at its minimum, warm (the stack before the trace begins).
        for s in self.svcs.values():
            for _ in range(s.sp.min_replicas):
                self.cluster.add_replica(s, 0.0, ready_now=True)

    def run(self) -> SimResult:
        # The hot loop (one pass per task arrival and per timed event): everything it reads
        # often is a local, and ``t_cycle`` is recomputed only where a ring or a cycle moves it.
        cluster, detection, cycles = self.cluster, self.detection, self.cycles
        heap, handle, complete, publish = (
            cluster.heap,
            cluster.handle,
            cluster.complete,
            cluster.publish,
        )
        stream, n_stream = self.stream, len(self.stream)
        ai = 0
        t_arr = stream[0][0] if n_stream else INF
        total, watch_done = self.total_tasks, self.horizon_s is None
        end_at = self.end_at
        t_cycle = min(cycles.next, detection.wake)
        while True:
            t_ev = heap[0][0] if heap else INF
            if t_ev <= t_arr and t_ev <= t_cycle:  # a completion, a replica ready or gone
                if t_ev > end_at:
                    break
                now, _, kind, a, r, tid = heappop(heap)
                if kind == COMPLETE:
                    complete(a, r, tid, now)
                    if watch_done and cluster.total_done == total:
                        self.last_completion = now
                        self.settled_end = default_horizon(self.policy, self.model, self.trace, now)
                        end_at = self.end_at = self.settled_end
                else:
                    handle(now, kind, a, r, tid)
            elif detection.trailing < t_arr and detection.trailing <= t_cycle:
                if detection.trailing > end_at:
                    break
                detection.fire_trailing()
                t_cycle = min(cycles.next, detection.wake)
            elif t_arr <= t_cycle:  # tasks published
                if t_arr > end_at:
                    break
                now, n, q = stream[ai]
                ai += 1
                t_arr = stream[ai][0] if ai < n_stream else INF
                publish(q, n, now)
                if detection.arrival(q.svc, now):
                    t_cycle = min(cycles.next, detection.wake)
            else:
                if t_cycle > end_at:
                    break
                self._cycle(t_cycle)
                if watch_done and self.settled_end is None and t_cycle >= self.cap:
                    break
                t_cycle = min(cycles.next, detection.wake)
        return self._result()

    # -- one cycle: observe, decide, arm, record, act ------------------------------------------
    def _cycle(self, now: float) -> None:
        """What ``scaler.loop.Scaler.cycle`` does, on the modelled backend: observe, decide,
        arm the detection, record, act, and record the count reached in the history."""
        self.n_cycles += 1
        window = self.cycles.tick(now, self.detection.wake)
        self.detection.deciding()
        clock = self.clock_origin + now  # the decision clock: the scaler's monotonic reading
        obs, seen = self._observe(now, clock, window)
        decided, self.history = decide(self.policy, obs, self.history, clock)
        self.detection.arm(decided, seen)
        keep, steps, records, scale = self.keep, self.steps, self.records, self.cluster.scale
        for name, (serving, w, f, age_max) in seen.items():
            s, d = self.svcs[name], decided[name]
            # The step as observed (plus what was decided); the decision too, as ``keep`` says.
            steps.append(
                Step(now, name, serving, s.n_starting, s.n_draining, w, f, age_max, d.desired,
                     d.action, s.n_warm + s.n_warming)
            )  # fmt: skip
            if keep == "all" or (keep == "changes" and (d.action != "hold" or d.emergency)):
                records.append(
                    DecisionRecord(now, name, d.current, d.desired, d.action, d.emergency,
                                   d.reasons, d.recommended)
                )  # fmt: skip
            if d.desired is None:
                continue
            scale(s, d.desired, d.warm, now, hold=d.action == "hold")
            after = s.n_ready + s.n_starting
            if after != serving:
                self.history = self.history.record_action(name, serving, after, clock)
                self.actions.append(Action(now, name, serving, after, d.desired))

    def _host_cpu_override(self, now: float) -> float | None:
        """The trace's host CPU schedule at ``now`` (None: modelled from the tasks)."""
        sched = self.host_sched
        while self.sched_i < len(sched) and sched[self.sched_i][0] <= now:
            self.sched_val = sched[self.sched_i][1]
            self.sched_i += 1
        return self.sched_val

    def _observe(
        self, now: float, clock: float, window: float
    ) -> tuple[Observations, dict[str, tuple[int, int, int, float | None]]]:
        """What the loop's collectors would read now, and per service (serving, waiting, in
        flight, oldest age) for the record. CPU is the mean over the cycle's window."""
        override = self._host_cpu_override(now)
        host_load = 0.0
        services: dict[str, ServiceObservation] = {}
        seen: dict[str, tuple[int, int, int, float | None]] = {}
        for s in self.svcs.values():
            s.cpu_to(now)
            mean_load = (s.cpu_int - s.cpu_last_int) / window if window > 0 else s.cpu_load
            s.cpu_last_int = s.cpu_int
            host_load += mean_load
            if s.n_ready:
                cpu: float | None = min(100.0, mean_load * s.cpu_scale / s.n_ready)
                mem: float | None = s.mem
            else:
                cpu = mem = None
            signals = {}
            age_max: float | None = None
            for q in s.queues:
                waiting = q.next_pub - q.next_start
                age = now - q.publish[q.next_start] if waiting else None
                signals[q.name] = QueueSignal(q.name, waiting, q.next_start - q.done, age, clock)
                if age is not None and (age_max is None or age > age_max):
                    age_max = age
            w, f = queue_totals(signals.values())
            serving = s.n_ready + s.n_starting
            services[s.name] = ServiceObservation(
                s.name, serving, signals, Resources(cpu, mem, clock), s.busy,
                s.n_warm + s.n_warming,
            )  # fmt: skip
            seen[s.name] = (serving, w, f, age_max)
        model = self.model.host
        host_cpu = min(100.0, model.base_cpu_percent + host_load) if override is None else override
        host = Resources(host_cpu, model.memory_percent, clock)
        return Observations(clock, services, host), seen

    # -- the result ----------------------------------------------------------------------------
    def _result(self) -> SimResult:
        horizon_s = self.horizon_s
        stop = min(self.end_at, self.cycles.last) if horizon_s is None else horizon_s
        rs: dict[str, float] = {}
        ws: dict[str, float] = {}
        for s in self.svcs.values():
            s.account(stop)
            rs[s.name] = s.rs_int
            ws[s.name] = s.ws_int
        tasks = {
            q.name: TaskLog(
                q.name, q.svc.name, q.publish[: q.next_pub], q.start, q.end[: q.next_pub],
                q.replica,
            )
            for q in self.queues.values()
        }  # fmt: skip
        return SimResult(
            policy=self.policy,
            model=self.model,
            seed=self.seed,
            horizon_s=stop,
            trace_duration_s=self.trace.duration_s,
            first_arrival=self.stream[0][0] if self.stream else None,
            steps=self.steps,
            decisions=self.records,
            actions=self.actions,
            tasks=tasks,
            replicas=self.cluster.lives,
            replica_seconds=rs,
            warm_seconds=ws,
            peak_replicas={s.name: s.peak for s in self.svcs.values()},
            cycles=self.n_cycles,
            settle_s=settle_time(self.policy, self.model),
            stats={
                "tasks_total": float(self.total_tasks),
                "tasks_done": float(self.cluster.total_done),
                "last_completion": self.last_completion,
                "woken_cycles": float(self.cycles.woken),
            },
        )
