"""Per-step wall-clock accounting for one pass of a loop whose parts are called through wrappers.

A benchmark wraps the objects a loop calls (queue reader, backend, host stats) so that each call
adds its duration to a named step; after the pass it reads the totals and resets them. The code
under test is run unchanged.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class StepTimer:
    """Accumulates seconds per step name until ``take()`` returns and clears them."""

    def __init__(self) -> None:
        self._totals: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._totals[name] += time.perf_counter() - started

    def call(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` as part of step ``name``."""
        with self.step(name):
            return fn()

    def take(self) -> dict[str, float]:
        """The totals since the last take (seconds per step), and start again from zero."""
        totals, self._totals = dict(self._totals), defaultdict(float)
        return totals
