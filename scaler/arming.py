"""Which services a new arrival should decide at once, and at what backlog (the arming rule).

After every cycle the loop arms event-driven detection (``scaler.wakeup``) per service, and the
simulator (``scaler.simulate.engine``) models the same rule with this same function, so that a
policy's reaction offline is the reaction it gets for real. A ring level is a backlog: an
arrival rings for the service when more than that many messages wait on its queues.

- **At its minimum with replicas** (and a depth target): armed at the backlog that would make
  the depth rule want more: ``tasks_per_replica x current x (1 + tolerance)`` of work, less what
  is in flight, computed with the rule's own arithmetic (never below what this cycle saw, so
  only growth rings; an emergency depth on one of its queues lowers it). A smaller backlog
  cannot change the decision (the depth rule keeps the count; latency and CPU rules are matters
  of time, which the ticks see), so it costs no decision. This also covers a burst whose first
  messages a decision saw and held: without it, that early decision disarmed the service and the
  rest of the burst waited for the next tick.
- **At 0** (any new backlog rings) with nothing waiting: a service at zero, one below the last
  decision's count, one whose count is unread, or one at its minimum without a depth target.
- Otherwise not armed: at its maximum (nothing to add), a decision already wants more (pacing
  holds it: an early decision would be held too), the service is above its minimum and not
  short, or a backlog waits where only a latency objective could change the decision.
"""

from __future__ import annotations

import math
from functools import lru_cache

from scaler.decide import Decision, depth_count
from scaler.policy import ServicePolicy

__all__ = ["ring_level"]


def ring_level(
    sp: ServicePolicy,
    decision: Decision | None,
    current: int | None,
    waiting: int,
    in_flight: int,
) -> int | None:
    """The backlog above which an arrival rings for this service; None when it is not armed."""
    wanted = decision.desired if decision is not None else None
    if current is not None and current >= sp.max_replicas:
        return None  # nothing to add: no decision could differ
    if current is None or current == 0 or (wanted or 0) > current:
        return 0 if waiting == 0 else None  # unread, asleep or short: any new backlog
    if current > sp.min_replicas:
        return None
    level = _depth_level(sp, decision, current, waiting, in_flight)
    if level is None:
        return 0 if waiting == 0 else None
    return level


def _depth_level(
    sp: ServicePolicy, decision: Decision | None, current: int, waiting: int, in_flight: int
) -> int | None:
    """The first backlog the depth rule scales a service at its minimum on, less one (None when
    the decision wants more already, or has no depth target)."""
    if decision is None:
        return None
    if decision.desired != current or decision.recommended is None:
        return None
    if decision.recommended > current or decision.emergency:
        return None
    tpr = sp.target.tasks_per_replica
    if tpr is None:
        return None
    level = max(waiting, _first_scaling_work(tpr, sp.target.tolerance, current) - 1 - in_flight)
    rule = sp.emergency
    if rule is not None and rule.depth is not None and rule.queue in sp.queues:
        level = min(level, max(waiting, rule.depth))
    return level


@lru_cache(maxsize=4096)
def _first_scaling_work(tpr: float, tolerance: float, current: int) -> int:
    """The least work (waiting + in flight) the depth rule wants more than ``current`` replicas
    for, found with its own arithmetic: the band's edge in floating point is where decide()
    puts it, not where the formula says. Cached: the simulator asks every cycle."""
    work = max(1, math.floor(tpr * current * (1 + tolerance)) - 1)
    while depth_count(tpr, tolerance, work, current) <= current:
        work += 1
    return work
