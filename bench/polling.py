"""Waiting for a condition with a deadline, instead of sleeping for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class BenchTimeout(RuntimeError):
    """A condition a benchmark waits for did not come true in time."""


def poll_until(
    probe: Callable[[], T | None], what: str, timeout_s: float = 30.0, every_s: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy; BenchTimeout naming ``what`` after that.

    Exceptions from the probe count as "not yet" (a server still starting refuses connections).
    """
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as exc:  # retried until the deadline
            last = exc
        if time.monotonic() >= deadline:
            raise BenchTimeout(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
        time.sleep(every_s)
