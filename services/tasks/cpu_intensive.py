"""CPU-bound tasks: real computation whose cost grows with ``size``."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from services.base_task import RecordingTask
from services.effects import apply_once

MAX_SIZE = 50_000_000


def count_primes_below(size: int) -> int:
    """Primes below ``size`` by trial division: deliberately CPU-heavy, no memory to speak of."""
    count = 0
    for n in range(2, size):
        if n > 3 and (n % 2 == 0 or n % 3 == 0):
            continue
        divisor, prime = 5, True
        while divisor * divisor <= n:
            if n % divisor == 0 or n % (divisor + 2) == 0:
                prime = False
                break
            divisor += 6
        count += prime
    return count


@shared_task(bind=True, base=RecordingTask, name="tasks.cpu_intensive.count_primes")
def count_primes(self: RecordingTask, size: int = 20_000, key: str | None = None) -> dict[str, Any]:
    """Count the primes below ``size`` (computed before the database transaction opens)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
        raise ValueError(f"size={size!r}: expected a whole number from 0 to {MAX_SIZE}")
    primes = count_primes_below(size)
    return apply_once(
        self.service.db,
        self.context(),
        self.name,
        lambda _: {"key": key, "size": size, "primes": primes},
    )
