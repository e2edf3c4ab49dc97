"""Which services a new arrival should decide at once, and at what backlog (the arming rule).

After every cycle the loop arms event-driven detection (``scaler.wakeup``) per service, and the
simulator (``scaler.simulate.engine``) models the same rule with this same function, so that a
policy's reaction offline is the reaction it gets for real. A ring level is a backlog: an
arrival rings for the service when more than that many messages wait on its queues.

- **Nothing waiting**, and the service at its minimum, below the last decision's count, or its
  count unread: armed at 0, any new backlog rings.
- **A backlog seen and held**: the decision kept the count because the work it saw was within
  the target (the early decision of a burst sees only its first messages). Armed at the backlog
  that would make the depth rule want more: ``tasks_per_replica x current x (1 + tolerance)``
  of work, less what is in flight (never below what this cycle saw, so only growth rings; an
  emergency depth on one of its queues lowers it). Without this, that early decision disarmed
  the service and the rest of the burst waited for the next tick.
- Otherwise not armed: at its maximum (nothing to add), a decision already wants more (pacing
  holds it: an early decision would be held too), the service is above its minimum and not
  short, or only a latency objective
  could change the decision (that is a matter of time, which the ticks see).
"""

from __future__ import annotations

import math

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
    if waiting == 0:
        if current is None or current <= sp.min_replicas or (wanted or 0) > current:
            return 0
        return None
    return _held_backlog_level(sp, decision, current, waiting, in_flight)


def _held_backlog_level(
    sp: ServicePolicy, decision: Decision | None, current: int | None, waiting: int, in_flight: int
) -> int | None:
    """The level for a service at its minimum whose decision saw a backlog and held."""
    if current is None or decision is None or current > sp.min_replicas or current == 0:
        return None
    if decision.desired != current or decision.recommended is None:
        return None
    if decision.recommended > current or decision.emergency:
        return None
    tpr = sp.target.tasks_per_replica
    if tpr is None:
        return None
    # The first backlog the depth rule scales on, found with its own arithmetic (the band's
    # edge in floating point is where decide() puts it, not where the formula says).
    more = max(waiting + 1, math.floor(tpr * current * (1 + sp.target.tolerance)) - in_flight - 1)
    while depth_count(sp.target, more + in_flight, current) <= current:
        more += 1
    level = more - 1
    rule = sp.emergency
    if rule is not None and rule.depth is not None and rule.queue in sp.queues:
        level = min(level, max(waiting, rule.depth))
    return level
