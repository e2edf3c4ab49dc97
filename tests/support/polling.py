"""Waiting for a condition with a deadline, instead of sleeping for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    probe: Callable[[], T | None],
    what: str,
    timeout_s: float = 30.0,
    every_s: float = 0.1,
    *,
    errors: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``probe`` until it returns something truthy and return that; at the deadline fail
    with an AssertionError naming ``what`` and the last answer. Exceptions of ``errors`` count as
    "not yet" (a server still starting refuses connections); any other propagates at once."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except errors as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what} (last: {last!r})"
            )
        time.sleep(every_s)
