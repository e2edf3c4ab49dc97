"""The dashboard's live feed: a bounded history of cycles and a feed of typed events."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scaler.backends.base import ScaleResult, WorkerInfo
from scaler.decide import Decision
from scaler.live import EVENT_KINDS, LiveFeed
from scaler.loop import ActOutcome, CycleReport
from scaler.observations import Observations, Resources
from scaler.status import ServiceStatus, Snapshot


@dataclass
class FakeBackend:
    running: int = 1
    draining: int = 0
    names: list[str] = field(default_factory=list)

    def workers(self, service: str) -> list[WorkerInfo]:
        out = [
            WorkerInfo(service, self.names[i] if i < len(self.names) else f"{service}-{i + 1}@h",
                       str(i), "running")
            for i in range(self.running)
        ]  # fmt: skip
        out += [WorkerInfo(service, f"d{i}", "x", "draining") for i in range(self.draining)]
        return out


@dataclass
class FakeSource:
    loaded_at: float | None = 1.0
    error: str | None = None
    path: Path | None = Path("policy.yaml")


@dataclass
class FakeScaler:
    """What LiveFeed reads of a Scaler, with a way to run one pretend cycle."""

    backend: FakeBackend = field(default_factory=FakeBackend)
    source: FakeSource = field(default_factory=FakeSource)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    last_snapshot: Snapshot | None = None
    live: Any = None
    cycles: int = 0

    def cycle_with(
        self,
        feed: LiveFeed,
        *,
        waiting: int | None,
        current: int,
        desired: int | None = None,
        started: tuple[str, ...] = (),
        draining: tuple[str, ...] = (),
        role: str = "single",
        overrides: dict[str, dict[str, Any]] | None = None,
        emergency: bool = False,
    ) -> None:
        self.cycles += 1
        before = current - len(started) + len(draining)
        desired = current if desired is None else desired
        action = "up" if current > before else "down" if current < before else "hold"
        decision = Decision("io", before, desired, action, ("work / target -> n",), emergency)
        result = ScaleResult("io", before, current, started=started, draining=draining)
        outcome = ActOutcome(acted=action != "hold", result=result if action != "hold" else None)
        self.backend.running = current
        self.backend.names = [f"io-{i + 1}@h" for i in range(current)]
        self.last_snapshot = Snapshot(
            written_at=time.time(),
            cycle=self.cycles,
            backend="fake",
            dry_run=False,
            policy_file=None,
            policy_loaded_at=None,
            policy_error=None,
            cycle_duration_s=0.01,
            consecutive_failures=0,
            errors=(),
            events=tuple(self.events),
            host={"cpu_percent": None, "memory_percent": None},
            services={
                "io": ServiceStatus(
                    "io",
                    before,
                    desired,
                    action,
                    decision.reasons,
                    waiting,
                    0,
                    None if not waiting else 2.5,
                    1,
                    4,
                )
            },
            role=role,
            leader={"owner": "me", "holder": "other"} if role != "single" else None,
            overrides=overrides or {},
        )
        report = CycleReport(
            Observations(0.0, {}, Resources(None, None)),
            {"io": decision},
            {"io": outcome},
            (),
            role != "standby",
        )
        feed.record(self, report)  # type: ignore[arg-type]


def kinds(feed: LiveFeed) -> list[str]:
    return [e["kind"] for e in feed.view()["events"]]


def test_points_keep_missing_signals_as_gaps_and_count_starting_and_draining() -> None:
    feed = LiveFeed()
    fake = FakeScaler()
    feed.attach(fake)  # type: ignore[arg-type]
    fake.cycle_with(feed, waiting=None, current=1)
    fake.cycle_with(feed, waiting=30, current=3, started=("io-2@h", "io-3@h"))
    fake.backend.draining = 1
    fake.cycle_with(feed, waiting=0, current=2, draining=("io-3@h",))
    points = feed.view()["points"]
    assert [p["services"]["io"]["waiting"] for p in points] == [None, 30, 0]
    assert [p["services"]["io"]["oldest_age_s"] for p in points] == [None, 2.5, None]
    second = points[1]["services"]["io"]
    assert (second["serving"], second["starting"]) == (1, 2)
    third = points[2]["services"]["io"]
    assert (third["serving"], third["starting"], third["draining"]) == (1, 1, 1)
    assert [p["seq"] for p in points] == [1, 2, 3]


def test_events_have_kinds_for_scale_drain_backend_lines_roles_policy_and_overrides() -> None:
    feed = LiveFeed()
    fake = FakeScaler()
    feed.attach(fake)  # type: ignore[arg-type]
    fake.cycle_with(feed, waiting=0, current=1, role="standby")
    fake.cycle_with(feed, waiting=0, current=1, role="leader")
    fake.cycle_with(feed, waiting=90, current=3, started=("a", "b"), role="leader", emergency=True)
    fake.cycle_with(feed, waiting=0, current=2, draining=("io-3@h",), role="leader")
    # The loop appends backend events as "<service> <kind>: <detail>".
    fake.events.append("io drained: io-3@h: finished its tasks")
    fake.events.append("io replaced: io-1@h died; started io-4@h")
    fake.events.append("io crash-loop: 3 crashes in a row")
    fake.events.append("something odd")
    fake.source.loaded_at = 2.0
    pin = {"mode": "pin", "replicas": 2, "by": "alice via api@127.0.0.1", "reason": ""}
    fake.cycle_with(feed, waiting=0, current=2, role="leader", overrides={"io": pin})
    fake.source.error = "policy.yaml: bad"
    fake.cycle_with(feed, waiting=0, current=2, role="leader")
    got = kinds(feed)
    assert got == [
        "leader", "leader", "emergency", "scale", "drain", "drain", "replace", "crash-loop",
        "backend", "policy", "override", "policy", "override",
    ]  # fmt: skip
    texts = [e["text"] for e in feed.view()["events"]]
    assert "standby -> leader" in texts[1]
    assert "io 1 -> 3 (up)" in texts[2]
    assert "io 3 -> 2 (down)" in texts[3] and "draining io-3@h" in texts[4]
    assert "io pinned to 2 by alice via api@127.0.0.1" in texts[10]
    assert "refused" in texts[11] and "removed" in texts[12]
    assert set(got) <= set(EVENT_KINDS)
    assert list(fake.events)[-1] == "something odd", "the loop's own deque still works"


def test_history_is_bounded_by_time_and_count_and_since_returns_only_new() -> None:
    now = [1000.0]
    feed = LiveFeed(history_s=10, max_points=5, max_events=3, wall_clock=lambda: now[0])
    fake = FakeScaler()
    feed.attach(fake)  # type: ignore[arg-type]
    for i in range(8):
        now[0] += 1
        fake.cycle_with(feed, waiting=i, current=1)
        fake.events.append(f"io drained: w{i}")
    view = feed.view()
    assert [p["services"]["io"]["waiting"] for p in view["points"]] == [3, 4, 5, 6, 7]
    assert len(view["events"]) == 3
    now[0] += 30  # past the window: only the newest point is kept
    fake.cycle_with(feed, waiting=9, current=1)
    assert [p["services"]["io"]["waiting"] for p in feed.view()["points"]] == [9]
    later = feed.since(view["point_seq"], view["event_seq"])
    assert [p["services"]["io"]["waiting"] for p in later["points"]] == [9]
    assert later["events"] == []


def test_subscribers_are_woken_after_each_cycle_and_can_leave() -> None:
    feed = LiveFeed()
    fake = FakeScaler()
    feed.attach(fake)  # type: ignore[arg-type]
    calls: list[int] = []
    leave = feed.subscribe(lambda: calls.append(1))
    feed.subscribe(lambda: 1 / 0)  # a broken subscriber harms nobody
    fake.cycle_with(feed, waiting=1, current=1)
    leave()
    fake.cycle_with(feed, waiting=1, current=1)
    assert calls == [1]
    assert feed.subscribers() == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="history_s"):
        LiveFeed(history_s=0)
