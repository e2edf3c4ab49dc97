"""What the decision core remembers between cycles: recent recommendations and scaling actions.

Two kinds of memory, updated by two different parties on purpose:

- what the core *saw* (recommendations for the stabilisation windows, when a service went idle,
  when it was first observed) is returned by ``scaler.decide.decide`` as a new ``History``;
- what the scaler *did* (the time of the last replica change, which starts the cooldowns) is
  recorded only by the caller, with ``History.record_action``, after the backend reports the count
  it actually reached. A scale that failed therefore starts no cooldown, and a partial one records
  what really happened.

``History()`` (empty) is a valid start: the core resumes from the observed replica counts and,
knowing nothing of the past, waits one full scale-down window before it scales anything down.
Values are frozen; every update returns a new object, so a cycle that raises midway leaves the
previous history intact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

__all__ = ["History", "ServiceHistory"]


@dataclass(frozen=True)
class ServiceHistory:
    """One service's memory."""

    # (time, recommendation) pairs, oldest first, pruned to the longest stabilisation window.
    recommendations: tuple[tuple[float, int], ...] = ()
    # First cycle this scaler process read the service's signals: the down window is not "full"
    # (and so may not scale down) until stabilization_s has passed since then.
    first_seen_at: float | None = None
    # Since when every queue of the service has been empty with nothing in flight (scale to zero).
    idle_since: float | None = None
    # The last replica change the caller actually carried out, and its direction.
    last_scale_at: float | None = None
    last_direction: Literal["up", "down"] | None = None

    def since_last_scale(self, now: float) -> float | None:
        """Seconds since the last replica change, or None if there has been none."""
        return None if self.last_scale_at is None else now - self.last_scale_at


_EMPTY = ServiceHistory()


@dataclass(frozen=True)
class History:
    """Memory for every service, keyed by worker service name."""

    services: Mapping[str, ServiceHistory] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        # A read-only view of a private copy: nobody can change a History after the fact.
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))

    def get(self, service: str) -> ServiceHistory:
        """The service's memory; an empty one for a service never seen."""
        return self.services.get(service, _EMPTY)

    def with_service(self, service: str, value: ServiceHistory) -> History:
        """A copy with one service's memory replaced."""
        return History({**self.services, service: value})

    def record_action(self, service: str, before: int, after: int, now: float) -> History:
        """Record a replica change the backend has carried out: ``before`` -> ``after`` at ``now``.

        Call it after acting, with the count the backend reports it reached (not the count the
        decision asked for). ``after == before`` (the scale failed or did nothing) records nothing,
        so a failed action never starts a cooldown as if it had happened.
        """
        if before < 0 or after < 0:
            raise ValueError(
                f"record_action({service!r}): before={before}, after={after} is invalid: "
                "replica counts must be >= 0"
            )
        if after == before:
            return self
        direction: Literal["up", "down"] = "up" if after > before else "down"
        updated = replace(self.get(service), last_scale_at=now, last_direction=direction)
        return self.with_service(service, updated)
