"""Event-driven detection in simulated time: the loop's own arming rule and ``Debouncer``.

A policy's reaction offline must be the one it gets for real, so nothing here re-implements the
detection: after each cycle the services are armed by ``scaler.arming.ring_level`` (what the loop
calls), and arrivals go through ``scaler.wakeup.Debouncer`` itself (the first arrival rings at
once, later ones in the window fold into one trailing ring at its end if the service is still
armed then, a service armed at a level rings once per arming, nothing rings while a cycle
decides), clocked by the simulation instead of its thread. What is modelled:

- The detector sees an arrival ``EVENT_LATENCY_S`` after its publish (keyspace notification):
  the debouncer's clock reads that time, and the backlog check (``LLEN`` of the service's
  lists, for real) reads the simulated queues.
- A ring asks for a cycle at its time, rounded up to a 1/256 s grid (``on_wake_grid``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from scaler.arming import ring_level
from scaler.decide import Decision
from scaler.policy import Policy
from scaler.simulate.cluster import SimService
from scaler.wakeup import Debouncer

__all__ = ["EVENT_LATENCY_S", "WAKE_GRID", "Detection", "on_wake_grid"]

EVENT_LATENCY_S = 0.005  # publish to the scaler's woken decision (keyspace notification + wake)
WAKE_GRID = 256  # woken cycles fall on a 1/256 s grid (see on_wake_grid)
INF = math.inf


def on_wake_grid(t: float) -> float:
    """``t`` rounded up to a multiple of 1/256 s: binary-exact, so decision-clock readings
    (origin + t) and their differences carry no rounding whatever whole-second origin the
    clock has, and a window boundary falls the same way from any origin."""
    return math.ceil(t * WAKE_GRID) / WAKE_GRID


class Detection:
    """The scaler's wake-ups for one run: ``wake`` is the earliest cycle a ring asked for,
    ``trailing`` when the debouncer's next trailing ring is due (both INF when none)."""

    def __init__(self, policy: Policy, services: Mapping[str, SimService]) -> None:
        self.enabled = policy.wakeup.events
        self._services = services
        self._levels: dict[str, int] = {}  # armed services and their ring level
        self._clock = 0.0
        self.wake = INF
        self.trailing = INF
        debounce = policy.wakeup.debounce_s
        self.debouncer = Debouncer(
            self._ring,
            self._levels.__contains__,
            lambda: debounce,
            clock=lambda: self._clock,
            backlog=self._backlog,
            level=self._level,
        )

    def _ring(self, services: set[str]) -> None:
        self.wake = min(self.wake, on_wake_grid(self._clock))

    def _level(self, service: str) -> int:
        return self._levels.get(service, 0)

    def _backlog(self, service: str) -> bool:
        return self._services[service].waiting() > self._levels.get(service, 0)

    def arrival(self, svc: SimService, now: float) -> bool:
        """Tasks published at ``now`` on ``svc``'s queue (after free slots took theirs), seen by
        the detector: the debouncer's, if the service is armed. True when it rang or left a
        trailing ring pending (``wake`` or ``trailing`` may have moved).

        One shortcut, exact: a service armed at a level whose backlog is not over it is not
        handed to the debouncer, which would only count it as coalesced (latched) or find no
        backlog (not latched) and change nothing else; most arrivals of a long run are these.
        """
        level = self._levels.get(svc.name)
        if level is None or (level and svc.waiting() <= level):
            return False
        self._clock = now + EVENT_LATENCY_S
        self.debouncer.arrival(svc.name)
        self._next_trailing()
        return True

    def fire_trailing(self) -> None:
        """The trailing rings due now (the engine calls this at ``trailing``)."""
        self._clock = max(self._clock, self.trailing)
        due = self.debouncer.fire_due()
        while due is not None and due <= self._clock:
            # (t + window) - t can fall an ulp short of the window: the thread would wait a
            # millisecond and find it due; simulated time moves on by the ulps it takes.
            self._clock = math.nextafter(self._clock, INF)
            due = self.debouncer.fire_due()
        self.trailing = INF if due is None else due

    def _next_trailing(self) -> None:
        due = self.debouncer.fire_due()
        self.trailing = INF if due is None else due

    def deciding(self) -> None:
        """A cycle starts: it consumes the wake that caused it; arrivals wait for its arming."""
        self.wake = INF
        self.debouncer.pause()

    def arm(
        self, decided: Mapping[str, Decision], seen: Mapping[str, tuple[int, int, int, object]]
    ) -> None:
        """Arm by the loop's rule after a cycle: ``seen`` is each service's (serving, waiting,
        in flight, ...) as the cycle observed it."""
        self._levels.clear()
        if self.enabled:
            for name, (serving, waiting, in_flight, _) in seen.items():
                sp = self._services[name].sp
                level = ring_level(sp, decided[name], serving, waiting, in_flight)
                if level is not None:
                    self._levels[name] = level
        self.debouncer.rearm()
        self._next_trailing()
