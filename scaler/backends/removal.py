"""Which serving replica a scale-down removes: one rule for every backend and the simulator.

A scale-down never kills work, so the idlest replicas go first (a backend that only drains idle
ones filters the busy out before or after); among equals the highest-numbered, the one Compose
itself would remove first and the last a scale-up created. ``scaler.simulate`` models the
backends with this same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["removal_order"]

R = TypeVar("R")


def removal_order(
    replicas: Iterable[R], tasks: Callable[[R], int], number: Callable[[R], int]
) -> list[R]:
    """``replicas`` in the order a scale-down takes them: fewest ``tasks`` (running plus
    reserved) first, then the highest ``number``."""
    return sorted(replicas, key=lambda r: (tasks(r), -number(r)))
