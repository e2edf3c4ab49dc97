"""When to start a service's workers again after they crash: one rule for every backend.

A worker that dies within ``crash_window_s`` of its start **crashed** (a bad image, a wrong
setting, a broker it cannot reach: it will crash again). Recreating it at once, every cycle, is a
restart storm, so consecutive crashes of a service delay its next start exponentially, like
Kubernetes' CrashLoopBackOff:

- the first crash is replaced at once (one early death may be a one-off: a kill, an OOM);
- from the second crash in a row, no worker of the service starts (neither a replacement nor a
  scale-up) for ``base_delay_s``, doubling with each further crash up to ``max_delay_s``;
- the count resets when a started replica outlives the window, or a worker that ran longer than
  the window dies (that is not a crash loop).

Each step of the backoff is reported once, as a ``crash-loop`` event naming the service, the
crash count and the delay; :meth:`RestartBackoff.state` gives the current state for
``health().extra`` (and so for status). The backends call :meth:`exited` for each dead worker
(once per worker: repeated calls are ignored), ask :meth:`may_start` before starting any worker of
the service, call :meth:`started` after starting one and :meth:`forget` when a dead worker is
gone for good. All times are on ``clock`` (monotonic).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from scaler.backends.base import BackendEvent

CRASH_LOOP = "crash-loop"


@dataclass
class _ServiceState:
    crashes: int = 0  # consecutive crashes
    last_crash: float | None = None
    last_start: float | None = None
    hold_until: float = 0.0
    delay_s: float = 0.0
    seen: set[str] = field(default_factory=set)  # dead workers already counted


class RestartBackoff:
    """Per-service crash counting and start delays (see the module docstring)."""

    def __init__(
        self,
        *,
        crash_window_s: float = 30.0,
        base_delay_s: float = 5.0,
        max_delay_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("crash_window_s", crash_window_s),
            ("base_delay_s", base_delay_s),
            ("max_delay_s", max_delay_s),
        ):
            if value <= 0:
                raise ValueError(f"{name}={value!r}: expected a positive number of seconds")
        if max_delay_s < base_delay_s:
            raise ValueError(f"max_delay_s={max_delay_s!r}: expected >= base_delay_s")
        self.crash_window_s = crash_window_s
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._services: dict[str, _ServiceState] = {}
        self._events: list[BackendEvent] = []
        self._lock = threading.Lock()

    def delay_for(self, crashes: int) -> float:
        """Seconds before the next start after ``crashes`` consecutive crashes."""
        if crashes < 2:
            return 0.0
        return min(self.base_delay_s * 2.0 ** (crashes - 2), self.max_delay_s)

    def knows(self, service: str, worker: str) -> bool:
        """True if this dead worker was already counted."""
        with self._lock:
            state = self._services.get(service)
            return state is not None and worker in state.seen

    def exited(self, service: str, worker: str, lifetime_s: float | None) -> None:
        """A worker of ``service`` was found dead after ``lifetime_s`` seconds. Counted once per
        ``worker``; an unknown lifetime (None) is neither a crash nor a recovery."""
        now = self._clock()
        with self._lock:
            state = self._services.setdefault(service, _ServiceState())
            if worker in state.seen:
                return
            state.seen.add(worker)
            if lifetime_s is None:
                return
            if lifetime_s >= self.crash_window_s:
                self._reset(state)
                return
            state.crashes += 1
            state.last_crash = now
            state.delay_s = self.delay_for(state.crashes)
            state.hold_until = now + state.delay_s
            if state.delay_s > 0:
                self._events.append(
                    BackendEvent(
                        service,
                        CRASH_LOOP,
                        f"{state.crashes} crashes in a row (each within {self.crash_window_s:g} s "
                        f"of its start): next start in {state.delay_s:g} s",
                    )
                )

    def may_start(self, service: str) -> bool:
        """True when a worker of ``service`` may be started now."""
        now = self._clock()
        with self._lock:
            state = self._services.get(service)
            if state is None:
                return True
            self._maybe_recovered(state, now)
            return now >= state.hold_until

    def started(self, service: str) -> None:
        """A worker of ``service`` was just started (a replacement, a scale-up or a wake)."""
        now = self._clock()
        with self._lock:
            self._services.setdefault(service, _ServiceState()).last_start = now

    def forget(self, service: str, worker: str) -> None:
        """A dead worker is gone for good (removed or replaced): stop remembering it."""
        with self._lock:
            state = self._services.get(service)
            if state is not None:
                state.seen.discard(worker)

    def events(self) -> list[BackendEvent]:
        """The ``crash-loop`` events since the last call (one per backoff step)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def state(self) -> dict[str, dict[str, float | int]]:
        """Services with crashes counted: crashes in a row, the current delay and the seconds
        left before a worker may start, for ``health().extra`` and status."""
        now = self._clock()
        out: dict[str, dict[str, float | int]] = {}
        with self._lock:
            for service, state in self._services.items():
                self._maybe_recovered(state, now)
                if state.crashes:
                    out[service] = {
                        "crashes": state.crashes,
                        "delay_s": state.delay_s,
                        "retry_in_s": round(max(0.0, state.hold_until - now), 1),
                    }
        return out

    def _maybe_recovered(self, state: _ServiceState, now: float) -> None:
        """Reset once a worker started after the last crash has outlived the window."""
        if (
            state.crashes
            and state.last_start is not None
            and state.last_crash is not None
            and state.last_start >= state.last_crash
            and now - state.last_start >= self.crash_window_s
        ):
            self._reset(state)

    @staticmethod
    def _reset(state: _ServiceState) -> None:
        state.crashes = 0
        state.last_crash = None
        state.hold_until = 0.0
        state.delay_s = 0.0
