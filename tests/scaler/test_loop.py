"""The loop's safety rules, without worker processes: reload, blind scale-down, failed scales.

The broker is a real Redis (the session's, or one of the test's own that it kills). Where a scale
call has to fail on demand, a subclass of the real local backend raises instead of acting: that is
fault injection (nothing here can make process spawning fail on cue), and it says so.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from scaler_support import own_redis_server
from support.polling import poll_until

from scaler.backends.base import BackendError, ScaleResult, ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.control import ControlStore
from scaler.decide import Decision
from scaler.fencing import UNFENCED, Fence
from scaler.leader import LeaderLease
from scaler.loop import STANDBY_NOTE, PolicySource, Retry, Scaler, blind_spots
from scaler.metrics import ScalerMetrics
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.status import read_snapshot, render

GOOD = """
interval_s: 0.5
stale_after_s: 5
services:
  io:
    queues: [io_intensive]
    min_replicas: 0
    max_replicas: {max}
"""


class FailingBackend(LocalBackend):
    """Fault injection: the first ``failures`` scale calls raise, later ones record the call."""

    failures: int = 0
    calls: list[int]

    def scale(self, service: str, replicas: int, fence: Fence = UNFENCED) -> ScaleResult:
        self.calls.append(replicas)
        if len(self.calls) <= self.failures:
            raise BackendError("injected: engine unavailable")
        before = self.replicas(service)
        return ScaleResult(service, before, replicas)  # counted, not started: no processes here


def make_app(redis_url: str) -> Celery:
    app = Celery("loop-test", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"lt{uuid.uuid4().hex[:6]}:"}
    return app


def make_scaler(tmp_path: Path, app: Any, policy_max: int = 3, failures: int = 0) -> Scaler:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(GOOD.format(max=policy_max))
    backend = FailingBackend(app=app, workdir=tmp_path / "workers")
    backend.calls, backend.failures = [], failures
    backend.manage([ServiceSpec("io", ("io_intensive",))])
    return Scaler(
        PolicySource.from_file(policy_file),
        backend,
        Collector(queue_reader_for_app(app)),
        state_file=tmp_path / "state.json",
        retry=Retry(attempts=3, first_delay_s=0.01),
    )


def test_an_invalid_reload_is_refused_and_the_last_good_policy_stays(
    tmp_path: Path, redis_url: str
) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url))
    assert scaler.source.path is not None
    scaler.source.path.write_text(
        "services:\n  io:\n    queues: [io_intensive]\n    max_replicas: -2\n"
    )
    scaler.request_reload()
    scaler.cycle()
    assert scaler.source.policy.services["io"].max_replicas == 3  # still the good one
    error = read_snapshot(scaler.state_file)["policy_error"]  # type: ignore[arg-type]
    assert str(scaler.source.path) in error and "max_replicas" in error

    scaler.source.path.write_text(GOOD.format(max=5))
    scaler.request_reload()
    scaler.cycle()
    assert scaler.source.policy.services["io"].max_replicas == 5
    assert read_snapshot(scaler.state_file)["policy_error"] is None  # type: ignore[arg-type]


def test_no_scale_down_on_signals_that_could_not_be_read(tmp_path: Path) -> None:
    with own_redis_server() as (url, proc):
        scaler = make_scaler(tmp_path, make_app(url))
        healthy = scaler.collector.collect({"io": ["io_intensive"]}, scaler.backend)
        assert blind_spots(healthy, "io") == []
        proc.kill()
        proc.wait(10)
        report = scaler.cycle()
    assert report.decisions["io"].action == "hold"
    assert any("depth of io_intensive unreadable" in e for e in report.errors)
    # Even a "down" handed to the loop is refused while the signals are missing.
    down = Decision("io", current=2, desired=0, action="down", reasons=("test",))
    outcome = scaler._act(report.observations, down)
    assert not outcome.acted and "refused" in (outcome.error or "")
    assert scaler.backend.calls == []  # type: ignore[attr-defined]
    assert scaler.consecutive_failures == 1
    assert scaler.next_delay() == pytest.approx(2 * scaler.source.policy.interval_s)


def test_a_failed_scale_is_retried_with_backoff_then_reported(
    tmp_path: Path, redis_url: str
) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url), failures=5)
    up = Decision("io", current=0, desired=2, action="up", reasons=("test",))
    obs = scaler.collector.collect({"io": ["io_intensive"]}, scaler.backend)
    outcome = scaler._act(obs, up)
    assert scaler.backend.calls == [2, 2, 2]  # type: ignore[attr-defined]
    assert not outcome.acted and "failed after 3 attempts" in (outcome.error or "")

    scaler.backend.failures = 4  # type: ignore[attr-defined]  # the next attempt succeeds
    outcome = scaler._act(obs, up)
    assert outcome.acted and outcome.result is not None and outcome.result.after == 2
    assert scaler.backend.calls == [2, 2, 2, 2, 2]  # type: ignore[attr-defined]


def test_dry_run_decides_and_reports_but_never_acts(tmp_path: Path, redis_url: str) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url))
    scaler.dry_run = True
    scaler.source.policy = scaler.source.policy.model_copy(
        update={
            "services": {
                "io": scaler.source.policy.services["io"].model_copy(update={"min_replicas": 2})
            }
        }
    )
    report = scaler.cycle()
    assert report.decisions["io"].action == "up"
    assert scaler.backend.calls == []  # type: ignore[attr-defined]
    snapshot = read_snapshot(scaler.state_file)  # type: ignore[arg-type]
    assert snapshot["dry_run"] is True and snapshot["services"]["io"]["acted"] is False


def test_a_cycle_whose_scale_fails_starts_no_cooldown(tmp_path: Path, redis_url: str) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url), failures=100)
    io = scaler.source.policy.services["io"].model_copy(update={"min_replicas": 2})
    scaler.source.policy = scaler.source.policy.model_copy(update={"services": {"io": io}})
    report = scaler.cycle()
    assert report.decisions["io"].action == "up"
    assert report.outcomes["io"].error and not report.outcomes["io"].acted
    assert scaler.history.get("io").last_scale_at is None
    status = read_snapshot(scaler.state_file)["services"]["io"]  # type: ignore[arg-type]
    assert status["action"] == "error" and "failed after 3 attempts" in status["error"]


# -- issue 5: leader lease, operator overrides and metrics in the cycle --------------------------


def with_min(scaler: Scaler, replicas: int) -> None:
    """Raise io's min so every cycle wants to scale up (something a standby must not do)."""
    io = scaler.source.policy.services["io"].model_copy(update={"min_replicas": replicas})
    scaler.source.policy = scaler.source.policy.model_copy(update={"services": {"io": io}})


@pytest.fixture
def scoped(redis_url: str, key_prefix: str) -> Iterator[str]:
    """A key prefix of this test's own for leases and overrides; its keys deleted afterwards."""
    prefix = f"{key_prefix}loop{uuid.uuid4().hex[:6]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def lease(redis_url: str, prefix: str, owner: str) -> LeaderLease:
    return LeaderLease.from_url(redis_url, name="scaler", prefix=prefix, owner=owner, lease_s=5)


def test_a_standby_decides_but_never_scales_until_it_holds_the_lease(
    tmp_path: Path, redis_url: str, scoped: str
) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url))
    with_min(scaler, 2)
    other = lease(redis_url, scoped, "other-replica")
    assert other.step()
    scaler.leader = lease(redis_url, scoped, "this-replica")
    assert not scaler.leader.step()

    report = scaler.cycle()
    assert report.decisions["io"].action == "up"  # it decides like the leader would...
    assert scaler.backend.calls == []  # type: ignore[attr-defined]  # ...but never acts
    assert report.outcomes["io"].note == STANDBY_NOTE and not report.leading
    snapshot = read_snapshot(scaler.state_file)  # type: ignore[arg-type]
    assert snapshot["role"] == "standby" and snapshot["leader"]["holder"] == "other-replica"
    assert snapshot["services"]["io"]["note"] == STANDBY_NOTE
    assert "role standby, not acting" in render(snapshot)

    other.release()  # the old leader stops cleanly
    assert scaler.leader.step()
    report = scaler.cycle()
    assert report.leading and report.outcomes["io"].acted
    assert scaler.backend.calls == [2]  # type: ignore[attr-defined]
    assert read_snapshot(scaler.state_file)["role"] == "leader"  # type: ignore[arg-type]


class LeaseLosingBackend(FailingBackend):
    """Fault injection: the scale call hangs long enough for the lease to lapse, then fails.
    (Releasing the lease stands in for the lapse; waiting out a real one would only be slower.)"""

    lease: LeaderLease

    def scale(self, service: str, replicas: int, fence: Fence = UNFENCED) -> ScaleResult:
        self.calls.append(replicas)
        self.lease.release()
        raise BackendError("injected: engine call timed out")


def test_a_lease_lost_mid_cycle_stops_the_retries(
    tmp_path: Path, redis_url: str, scoped: str
) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url))
    with_min(scaler, 2)
    backend = LeaseLosingBackend(app=scaler.backend.app, workdir=tmp_path / "w2")  # type: ignore[attr-defined]
    backend.calls, backend.lease = [], lease(redis_url, scoped, "this-replica")
    scaler.backend, scaler.leader = backend, backend.lease
    assert scaler.leader.step()

    report = scaler.cycle()
    assert backend.calls == [2], "no retry once the lease is gone (retry allows 3 attempts)"
    error = report.outcomes["io"].error or ""
    assert error.startswith("leader: lease lost") and not report.outcomes["io"].acted


class StuckCollector(Collector):
    """Fault injection: once ``stuck`` is set, the cycle hangs in collect() until it clears
    (a hung read with no timeout), while the process and its renewer thread run on."""

    stuck: threading.Event
    resume: threading.Event

    def collect(self, *args: Any, **kwargs: Any) -> Any:
        if self.stuck.is_set():
            self.resume.wait(30)
        return super().collect(*args, **kwargs)


class HangingCollector(StuckCollector):
    """A StuckCollector that notes when the first stuck cycle reached it."""

    hung_at: float | None = None

    def collect(self, *args: Any, **kwargs: Any) -> Any:
        if self.stuck.is_set() and self.hung_at is None:
            self.hung_at = time.monotonic()
        return super().collect(*args, **kwargs)


@contextmanager
def leading_loop(
    tmp_path: Path, redis_url: str, scoped: str, lease_s: float
) -> Iterator[tuple[Scaler, HangingCollector, LeaderLease]]:
    """A scaler leading with a collector the test can hang, its loop running, and a standby
    lease trying to take over; a few cycles done as leader."""
    scaler = make_scaler(tmp_path, make_app(redis_url))
    collector = HangingCollector(queue_reader_for_app(scaler.backend.app))  # type: ignore[attr-defined]
    collector.stuck, collector.resume = threading.Event(), threading.Event()
    scaler.collector = collector
    scaler.leader = leader = LeaderLease.from_url(
        redis_url, name="scaler", prefix=scoped, owner="hung", lease_s=lease_s
    )
    scaler.stall_s = 1.0
    standby = LeaderLease.from_url(
        redis_url, name="scaler", prefix=scoped, owner="standby", lease_s=lease_s
    )
    stop = threading.Event()
    assert leader.step()
    leader.start()
    loop = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    loop.start()
    standby.start()
    try:
        poll_until(lambda: scaler.cycles >= 3, "a few cycles as leader", timeout_s=10)
        assert leader.is_leader() and not standby.is_leader()
        yield scaler, collector, standby
    finally:
        stop.set()
        collector.resume.set()
        loop.join(10)
        leader.stop()
        standby.stop()


def test_a_stuck_loop_lets_the_lease_lapse_to_the_standby_and_stands_by_once_it_resumes(
    tmp_path: Path, redis_url: str, scoped: str
) -> None:
    with leading_loop(tmp_path, redis_url, scoped, lease_s=1.0) as (scaler, collector, standby):
        assert scaler.leader is not None
        collector.stuck.set()
        poll_until(standby.is_leader, "the standby to lead", timeout_s=10, every_s=0.02)
        assert not scaler.leader.is_leader()
        assert "loop stalled" in (scaler.leader.last_error or "")
        collector.stuck.clear()
        collector.resume.set()  # the loop completes cycles again: it stands by
        cycles = scaler.cycles
        poll_until(lambda: scaler.cycles >= cycles + 2, "cycles again", timeout_s=10)
        assert standby.is_leader() and not scaler.leader.is_leader()


def test_a_hung_cycle_loses_the_lease_within_the_documented_bound(
    tmp_path: Path, redis_url: str, scoped: str
) -> None:
    """docs/scaler-operations.md: a cycle that hangs loses the key at most ``stall budget +
    safety`` after it began (the loop tells the lease when a cycle starts; renewals near the
    deadline set no TTL past it plus the margin), and the standby leads within a third of a
    lease more."""
    lease_s = 2.0
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with leading_loop(tmp_path, redis_url, scoped, lease_s) as (scaler, collector, standby):
        leader = scaler.leader
        assert leader is not None
        collector.stuck.set()
        poll_until(lambda: collector.hung_at, "a cycle to hang", timeout_s=5, every_s=0.005)
        poll_until(
            lambda: client.get(leader.key) != "hung",
            "the hung leader's key to go",
            timeout_s=5 * lease_s,
            every_s=0.005,
        )
        assert collector.hung_at is not None
        lost = time.monotonic() - collector.hung_at
        bound = scaler.stall_budget_s() + leader.safety_s
        print(f"hung cycle: key gone after {lost:.3f} s (bound {bound:.2f} s)")
        assert lost <= bound + 0.25, f"key gone {lost:.2f} s after the hang, bound {bound:.2f} s"
        poll_until(standby.is_leader, "the standby to lead", timeout_s=2 * lease_s, every_s=0.005)
        took = time.monotonic() - collector.hung_at
        print(f"hung cycle: standby led after {took:.3f} s (bound {bound + lease_s / 3:.2f} s)")
        assert took <= bound + lease_s / 3 + 0.25
        assert not leader.is_leader()
    client.close()


def test_unreadable_overrides_hold_every_service(tmp_path: Path, redis_url: str) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url))
    with_min(scaler, 2)
    with own_redis_server() as (url, proc):
        scaler.control = ControlStore.from_url(url, {"io": 3})
        proc.kill()
        proc.wait(10)
        report = scaler.cycle()
    decision = report.decisions["io"]
    assert decision.action == "hold" and "overrides unreadable" in " ".join(decision.reasons)
    assert any(e.startswith("control: cannot read overrides") for e in report.errors)
    assert scaler.backend.calls == []  # type: ignore[attr-defined]


def test_pause_and_pin_steer_the_decisions_and_the_metrics_show_them(
    tmp_path: Path, redis_url: str, scoped: str
) -> None:
    scaler = make_scaler(tmp_path, make_app(redis_url))
    scaler.control = ControlStore.from_url(redis_url, {"io": 3}, prefix=scoped)
    scaler.metrics = ScalerMetrics()

    scaler.control.pin("io", 3, by="test", reason="load test")
    report = scaler.cycle()
    assert report.decisions["io"].desired == 3 and scaler.backend.calls == [3]  # type: ignore[attr-defined]
    assert "pinned to 3" in report.decisions["io"].reasons[0]
    assert read_snapshot(scaler.state_file)["services"]["io"]["override"] == "pinned 3"  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scaler.metrics.exposition().decode())
        for s in family.samples
    }
    assert samples[("scaler_replicas_desired", (("service", "io"),))] == 3
    assert samples[("scaler_override", (("mode", "pin"), ("service", "io")))] == 1
    assert samples[("scaler_leader", ())] == 1  # no lease: a single scaler acts

    with_min(scaler, 2)
    scaler.control.pause("io", by="test")  # replaces the pin
    report = scaler.cycle()
    assert report.decisions["io"].action == "hold"
    assert "paused by operator" in report.decisions["io"].reasons[0]
    assert scaler.backend.calls == [3]  # type: ignore[attr-defined]  # nothing more


# -- issue 9: one failing service backs off alone; decisions on the monotonic clock -------------

TWO = """
interval_s: 0.5
stale_after_s: 5
services:
  a:
    queues: [qa]
    min_replicas: 2
    max_replicas: 3
  b:
    queues: [qb]
    min_replicas: 2
    max_replicas: 3
"""


class OneServiceFailing(LocalBackend):
    """Fault injection: every scale of service "a" raises while ``a_fails``; others are counted
    (not started: no processes here), so every cycle asks to restore the minimum again."""

    a_fails: bool = True
    calls: dict[str, int]

    def scale(self, service: str, replicas: int, fence: Fence = UNFENCED) -> ScaleResult:
        self.calls[service] = self.calls.get(service, 0) + 1
        if service == "a" and self.a_fails:
            raise BackendError("injected: engine refused service a")
        return ScaleResult(service, self.replicas(service), replicas)


class Offset:
    """The real monotonic clock plus an offset the test moves (signals stay fresh: the offset
    stays below stale_after_s), so a backoff can expire without waiting for it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_one_service_failing_to_scale_backs_off_alone(tmp_path: Path, redis_url: str) -> None:
    app = make_app(redis_url)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(TWO)
    backend = OneServiceFailing(app=app, workdir=tmp_path / "workers")
    backend.calls = {}
    backend.manage([ServiceSpec("a", ("qa",)), ServiceSpec("b", ("qb",))])
    clock = Offset()
    scaler = Scaler(
        PolicySource.from_file(policy_file),
        backend,
        Collector(queue_reader_for_app(app)),
        retry=Retry(attempts=2, first_delay_s=0.01),
        clock=clock,
    )

    report = scaler.cycle()
    assert report.outcomes["a"].scale_failed and report.outcomes["b"].acted
    assert backend.calls == {"a": 2, "b": 1}
    # The loop keeps its pace: only service a waits (2 intervals after its first failure).
    assert scaler.consecutive_failures == 0 and scaler.next_delay() == 0.5
    assert scaler.backoffs["a"].failures == 1

    report = scaler.cycle()  # inside a's backoff: a is not tried, b acts again
    assert backend.calls == {"a": 2, "b": 2}
    assert "backing off after 1 failed scale(s)" in (report.outcomes["a"].note or "")
    assert report.outcomes["b"].acted

    clock.offset += 1.1  # past 2 x 0.5 s
    scaler.cycle()
    assert backend.calls["a"] == 4 and scaler.backoffs["a"].failures == 2  # next wait 4 x 0.5 s

    backend.a_fails = False
    clock.offset += 2.1
    report = scaler.cycle()
    assert report.outcomes["a"].acted and "a" not in scaler.backoffs


def test_decisions_run_on_the_monotonic_clock_and_the_wall_clock_only_stamps_status(
    tmp_path: Path, redis_url: str
) -> None:
    """Windows, cooldowns and the idle timer are stamped on the monotonic clock, so a step of the
    wall clock (NTP, a resumed VM) can neither empty nor freeze them."""
    assert Scaler.__dataclass_fields__["clock"].default is time.monotonic
    scaler = make_scaler(tmp_path, make_app(redis_url))
    wall = [1_900_000_000.0]
    scaler.wall_clock = lambda: wall[0]
    with_min(scaler, 2)
    assert scaler.cycle().outcomes["io"].acted
    started = scaler.history.get("io").last_scale_at
    assert started is not None and abs(started - time.monotonic()) < 5
    wall[0] -= 3600.0  # stepped back an hour
    scaler.cycle()
    remembered = scaler.history.get("io").recommendations
    assert all(abs(t - time.monotonic()) < 5 for t, _ in remembered), remembered
    assert read_snapshot(scaler.state_file)["written_at"] == wall[0]  # type: ignore[arg-type]


def test_status_says_what_the_counts_leave_out(tmp_path: Path, redis_url: str) -> None:
    """A message whose ETA is ahead is in the queue but not waiting: status says so."""
    app = make_app(redis_url)
    scaler = make_scaler(tmp_path, app)
    app.send_task("tasks.io_intensive.wait", queue="io_intensive", countdown=600)
    report = scaler.cycle()
    assert report.observations.services["io"].queues["io_intensive"].waiting == 0
    status = read_snapshot(scaler.state_file)  # type: ignore[arg-type]
    assert status["services"]["io"]["not_due"] == 1
    assert "[1 not due yet]" in render(status)
