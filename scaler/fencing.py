"""Fencing: every action on the workers checks the lease it was started under.

A leader that loses its lease (frozen, partitioned from Redis, or its loop stuck) must not go on
acting: its scale, reconcile and drain threads may wake up after a standby has taken over, and two
actors on one engine fight (one drains the worker the other just adopted). So each action carries
a :class:`Fence` taken when it began, and calls :meth:`Fence.check` right before every mutating
engine or broker call (create, start, stop, remove, kill, cancel or add a consumer). The check
raises :class:`LeadershipLost` when this replica is no longer leader, or is leader again under a
newer lease generation (the fencing token: Redis INCRs it on each acquisition, so a lapse and a
re-acquisition make every older fence stale even though the owner id is the same).

The check is local, with no Redis round trip per call: the lease counts itself valid only until
``time before the last successful renewal + its TTL - safety`` on the monotonic clock (failed
renewals in between are retried, not counted), and Redis cannot expire the key (and so let anyone
else take it) before ``that send time + TTL``. A round trip would not make the check and the
engine call atomic either (the engine knows no tokens), and it would fail every call while Redis
blips. What neither closes: a call sent just before validity ends that lands later; the safety
margin (20 % of the lease) is that call's budget. So a long operation is re-checked before its
irreversible step: a stop sends the stop signal, waits for the exit with the fence checked as it
goes, and checks again right before the kill or the removal (the engine's own stop would kill at
the end of the grace period whoever leads by then).

Without leader election (one scaler) actions use :data:`UNFENCED`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class LeadershipLost(RuntimeError):
    """An action was refused: the lease it was started under is gone or superseded."""


class Fence(Protocol):
    """What the backends call right before each mutating call."""

    def check(self, action: str) -> None:
        """Return if ``action`` may go ahead; raise :class:`LeadershipLost` if not."""


class LeaseView(Protocol):
    """The part of :class:`scaler.leader.LeaderLease` a fence reads (kept small for tests)."""

    def current_generation(self) -> int | None:
        """The generation while this replica is leader by its local clock, else None."""

    def note_refused(self, message: str) -> None:
        """Count and log an action a fence refused (``message`` says which and why)."""


@dataclass(frozen=True)
class Unfenced:
    """No election: every action may go ahead."""

    def check(self, action: str) -> None:
        return None


UNFENCED = Unfenced()


@dataclass(frozen=True)
class LeaseFence:
    """Valid while ``lease`` is leader under ``generation`` (the one the action began under)."""

    lease: LeaseView
    generation: int | None  # None: not leader when taken, so every check refuses

    def check(self, action: str) -> None:
        current = self.lease.current_generation()
        if current is not None and current == self.generation:
            return
        why = (
            "not the leader any more"
            if current is None
            else f"lease generation is now {current}, this action began under {self.generation}"
        )
        message = f"{action}: refused, {why}"
        self.lease.note_refused(message)
        raise LeadershipLost(message)
