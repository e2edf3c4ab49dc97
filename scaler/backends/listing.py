"""The managed services and one shared listing per loop cycle: what both container backends keep.

Listing the engine's containers (Compose) or tasks (Swarm) is the expensive read, so after
``begin_cycle()`` the first listing (or the error it raised) is shared by the cycle's reads;
actions (scale, reconcile) list afresh, and anything that changes the workers drops the shared
listing (``_invalidate``). ``_generation`` counts those drops, so a listing taken across one is
never stored. Without ``begin_cycle()`` (tests, one-off callers) every read lists.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Generic, TypeVar

from scaler.backends.base import BackendError, ServiceSpec

L = TypeVar("L")


class CycleListing(Generic[L]):
    """Base of the container backends: their managed specs and the cycle's shared listing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, ServiceSpec] = {}
        self._in_cycle = False
        self._snapshot: L | BackendError | None = None
        self._generation = 0
        self._adopt_pending = True  # check every live worker's consumers at the next reconcile

    def manage(self, specs: Sequence[ServiceSpec]) -> None:
        """Manage exactly these services (the policy's); no other worker is ever touched."""
        for spec in specs:
            if not spec.name:
                raise ValueError(f"service name {spec.name!r}: expected a non-empty name")
        with self._lock:
            self._specs = {spec.name: spec for spec in specs}
            self._adopt_pending = True
        self._invalidate()

    def begin_cycle(self) -> None:
        """Start a cycle: the next listing is taken afresh and shared by the cycle's reads."""
        with self._lock:
            self._in_cycle = True
        self._invalidate()

    def services(self) -> list[str]:
        return list(self._specs)

    def _check_managed(self, service: str) -> None:
        if service not in self._specs:
            raise BackendError(
                f"service {service!r} is not managed here (policy names: {sorted(self._specs)})"
            )

    def _invalidate(self) -> None:
        """Drop the cycle's shared listing: something changed, or may have, since it was taken."""
        with self._lock:
            self._snapshot = None
            self._generation += 1

    def _share(self, generation: int, listing: L | BackendError) -> None:
        """Keep ``listing`` for the cycle's reads, unless it was dropped while being taken."""
        with self._lock:
            if self._in_cycle and generation == self._generation:
                self._snapshot = listing

    def _shared(self) -> L | None:
        """The cycle's shared listing; BackendError again if the cycle's listing failed."""
        with self._lock:
            shared = self._snapshot
        if isinstance(shared, BackendError):
            raise BackendError(f"{shared} (this cycle's listing; not asked again)")
        return shared
