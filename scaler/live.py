"""What the live dashboard shows: a bounded history of recent cycles and a feed of typed events.

The loop calls :meth:`LiveFeed.record` once per cycle, after it has written its status snapshot.
That call only reads what the cycle already has (the report, the snapshot) plus the backend's view
of its workers (the cycle's shared listing, or one listing after a scale), appends one small point
to a ring buffer and wakes the HTTP server's subscribers; serialising to JSON happens in the HTTP
thread, per request, never in the cycle.

- **Points**: per service, the replicas serving, starting and draining, the desired count,
  waiting and in-flight messages and the oldest message's age, one point per cycle, kept for
  ``history_s`` seconds (and at most ``max_points``). A missing signal stays ``None`` (a gap on
  the chart), never 0.
- **Events**: scale, drain, replace, crash-loop, emergency, policy reload, leader change,
  override and failed scale, each with a kind (a fixed word, for colour and filtering), the
  service (or None) and the words. At most ``max_events``, newest last.

"starting" counts workers this scaler started less than ``starting_s`` seconds ago (a Celery
worker needs a few seconds between its process starting and its first task); a standby, which
starts nothing, shows every running worker as serving. Warm-pool replicas (booted, consuming
nothing: not capacity) are their own key, ``warm``, and never counted as serving.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaler.loop import CycleReport, Scaler

#: Event kinds, in the order the dashboard's legend lists them.
EVENT_KINDS = (
    "scale",
    "drain",
    "replace",
    "crash-loop",
    "restore",
    "emergency",
    "policy",
    "leader",
    "override",
    "scale-failed",
    "backend",
)
# A backend event's kind (BackendEvent.kind) -> the feed's kind.
_BACKEND_KINDS = {
    "drained": "drain",
    "drain-timeout": "drain",
    "replaced": "replace",
    "replace-failed": "replace",
    "crash-loop": "crash-loop",
    "restored": "restore",
    "restore-failed": "restore",
    "override-rejected": "override",  # not a backend's, but said the same way (Scaler.events)
}
# The loop keeps backend events as "<service> <kind>: <detail>" (Scaler.events).
_BACKEND_TEXT = re.compile(r"^(?P<service>\S+) (?P<kind>[^\s:]+): (?P<detail>.*)$", re.DOTALL)


@dataclass(frozen=True)
class FeedEvent:
    """One line of the event feed."""

    seq: int
    at: float  # wall clock, seconds
    kind: str  # one of EVENT_KINDS
    service: str | None
    text: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class _NotifyingDeque(deque[str]):
    """The loop's ``events`` deque, telling the feed about each appended line."""

    def __init__(self, items: Iterable[str], maxlen: int | None, on_append: Callable[[str], None]):
        super().__init__(items, maxlen)
        self._on_append = on_append

    def append(self, item: str) -> None:
        super().append(item)
        self._on_append(item)


class LiveFeed:
    """Recent cycles and events for the dashboard; written by the loop, read by the HTTP thread."""

    def __init__(
        self,
        *,
        history_s: float = 600.0,
        max_points: int = 2400,
        max_events: int = 200,
        starting_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not history_s > 0 or max_points < 1 or max_events < 1:
            raise ValueError(
                f"history_s must be > 0 and max_points, max_events >= 1; got {history_s!r}, "
                f"{max_points!r}, {max_events!r}"
            )
        self.history_s = history_s
        self.starting_s = starting_s
        self._wall = wall_clock
        self._clock = clock
        self._lock = threading.Lock()
        self._points: deque[dict[str, Any]] = deque(maxlen=max_points)
        self._events: deque[FeedEvent] = deque(maxlen=max_events)
        self._point_seq = 0
        self._event_seq = 0
        self._status: dict[str, Any] = {}
        self._subscribers: dict[int, Callable[[], object]] = {}
        self._next_subscriber = 0
        self._started: dict[str, float] = {}  # worker name -> when this scaler started it
        self._role: str | None = None
        self._policy: tuple[float | None, str | None] | None = None
        self._overrides: dict[str, str] = {}

    # -- the loop's side ------------------------------------------------------------------------

    def attach(self, scaler: Scaler) -> None:
        """Follow ``scaler``: its backend events (Scaler.events) and every cycle it records."""
        events = scaler.events
        scaler.events = _NotifyingDeque(events, events.maxlen, self._backend_line)
        scaler.live = self

    def record(self, scaler: Scaler, report: CycleReport) -> None:
        """One cycle: a point, the events it produced, the latest status; wakes subscribers."""
        now_wall = self._wall()
        now = self._clock()
        snapshot = scaler.last_snapshot
        status = snapshot.to_dict() if snapshot is not None else {}
        events: list[tuple[str, str | None, str]] = []
        self._role_events(status, events)
        self._policy_events(scaler, events)
        self._override_events(status, events)
        services: dict[str, dict[str, Any]] = {}
        for name, row in (status.get("services") or {}).items():
            outcome = report.outcomes.get(name)
            decision = report.decisions.get(name)
            result = outcome.result if outcome is not None else None
            if result is not None:
                for worker in result.started:
                    self._started[worker] = now
                if result.after != result.before:
                    verb = "up" if result.after > result.before else "down"
                    why = decision.reasons[-1] if decision and decision.reasons else ""
                    kind = "emergency" if decision is not None and decision.emergency else "scale"
                    events.append(
                        (kind, name, f"{name} {result.before} -> {result.after} ({verb}): {why}")
                    )
                for worker in result.draining:
                    events.append(("drain", name, f"{name}: draining {worker}"))
            if outcome is not None and outcome.scale_failed and outcome.error:
                events.append(("scale-failed", name, outcome.error))
            services[name] = self._service_point(scaler, name, row, now)
        for worker, at in list(self._started.items()):
            if now - at > self.starting_s:
                del self._started[worker]
        point = {"t": now_wall, "cycle": status.get("cycle"), "role": status.get("role"),
                 "services": services}  # fmt: skip
        with self._lock:
            self._point_seq += 1
            point["seq"] = self._point_seq
            self._points.append(point)
            while self._points and now_wall - self._points[0]["t"] > self.history_s:
                self._points.popleft()
            self._status = status
            for kind, service, text in events:
                self._append_event(kind, service, text, now_wall)
        self._notify()

    def _service_point(
        self, scaler: Scaler, name: str, row: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        serving: int | None = row.get("current")
        warm: int | None = row.get("warm")
        starting: int | None = 0
        draining: int | None = None
        try:
            workers = scaler.backend.workers(name)
        except Exception:  # the chart shows a gap; the loop's own reads report the error
            workers = None
        if workers is not None:
            running = [w for w in workers if w.state == "running"]
            new = sum(1 for w in running if w.name in self._started)
            starting = new
            serving = max(0, len(running) - new - (warm or 0))  # members list as running
            draining = sum(1 for w in workers if w.state == "draining")
        return {
            "serving": serving,
            "starting": starting,
            "draining": draining,
            "warm": warm,
            "desired": row.get("desired"),
            "waiting": row.get("waiting"),
            "in_flight": row.get("in_flight"),
            "oldest_age_s": row.get("oldest_age_s"),
        }

    def _role_events(
        self, status: Mapping[str, Any], out: list[tuple[str, str | None, str]]
    ) -> None:
        role = status.get("role")
        if role is None or role == self._role:
            return
        lease = status.get("leader") or {}
        if role == "leader":
            text = f"this scaler leads ({lease.get('owner')})"
        elif role == "standby":
            text = f"this scaler stands by; the lease is held by {lease.get('holder') or 'nobody'}"
        else:
            text = "this scaler acts alone (no leader election)"
        if self._role is not None:
            text = f"{self._role} -> {role}: {text}"
        self._role = role
        out.append(("leader", None, text))

    def _policy_events(self, scaler: Scaler, out: list[tuple[str, str | None, str]]) -> None:
        source = scaler.source
        state = (source.loaded_at, source.error)
        previous, self._policy = self._policy, state
        if previous is None or previous == state:
            return
        if source.error and source.error != previous[1]:
            out.append(("policy", None, f"policy reload refused: {source.error}"))
        elif source.loaded_at != previous[0]:
            out.append(("policy", None, f"policy reloaded from {source.path}"))

    def _override_events(
        self, status: Mapping[str, Any], out: list[tuple[str, str | None, str]]
    ) -> None:
        now: dict[str, str] = {}
        for service, o in (status.get("overrides") or {}).items():
            what = "paused" if o.get("mode") == "pause" else f"pinned to {o.get('replicas')}"
            reason = f": {o['reason']}" if o.get("reason") else ""
            now[service] = f"{service} {what} by {o.get('by')}{reason}"
        for service, text in now.items():
            if self._overrides.get(service) != text:
                out.append(("override", service, text))
        for service in set(self._overrides) - set(now):
            out.append(("override", service, f"{service}: override removed"))
        self._overrides = now

    def _backend_line(self, line: str) -> None:
        match = _BACKEND_TEXT.match(line)
        if match is None:
            kind, service = "backend", None
        else:
            kind = _BACKEND_KINDS.get(match["kind"], "backend")
            service = match["service"]
        with self._lock:
            self._append_event(kind, service, line, self._wall())

    def _append_event(self, kind: str, service: str | None, text: str, at: float) -> None:
        self._event_seq += 1
        self._events.append(FeedEvent(self._event_seq, at, kind, service, text))

    # -- the HTTP server's side -----------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """Everything the page needs when it opens: history, events, the latest status."""
        with self._lock:
            return {
                "history_s": self.history_s,
                "event_kinds": list(EVENT_KINDS),
                "points": list(self._points),
                "events": [e.as_json() for e in self._events],
                "status": self._status,
                "point_seq": self._point_seq,
                "event_seq": self._event_seq,
            }

    def since(self, point_seq: int, event_seq: int) -> dict[str, Any]:
        """The points and events after the given sequence numbers, and the latest status."""
        with self._lock:
            return {
                "points": [p for p in self._points if p["seq"] > point_seq],
                "events": [e.as_json() for e in self._events if e.seq > event_seq],
                "status": self._status,
                "point_seq": self._point_seq,
                "event_seq": self._event_seq,
            }

    def subscribe(self, wake: Callable[[], object]) -> Callable[[], None]:
        """Call ``wake`` (from the loop's thread: keep it tiny) after each cycle; returns the
        function that unsubscribes."""
        with self._lock:
            key = self._next_subscriber
            self._next_subscriber += 1
            self._subscribers[key] = wake

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)

        return unsubscribe

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _notify(self) -> None:
        with self._lock:
            wakes = list(self._subscribers.values())
        for wake in wakes:
            with contextlib.suppress(Exception):  # a closed event loop: its stream is gone
                wake()
