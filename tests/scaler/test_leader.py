"""Leader election between scaler replicas against real Redis.

Electors run in threads or in a subprocess (so "the leader died" can be a real SIGKILL); the
"Redis down" case runs its own redis-server on a free port and kills it, never the shared one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from scaler.fencing import LeadershipLost
from scaler.leader import LeaderLease, LeaseSettings

LEASE_S = 0.6  # short, so renewals and expiries happen many times within a fast test


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = 10.0) -> float:
    """Poll ``condition`` until true; return the seconds it took. Fails with ``what``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
def name() -> str:
    """A lease name of this test's own."""
    return f"leader-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=2)
    yield c
    for key in c.scan_iter(match=f"{key_prefix}leader:leader-test-*"):
        c.delete(key)
    c.close()


def elector(url: str, prefix: str, name: str, owner: str, lease_s: float = LEASE_S) -> LeaderLease:
    return LeaderLease.from_url(url, name=name, prefix=prefix, owner=owner, lease_s=lease_s)


def test_only_one_leader_at_a_time_over_many_renewals(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    a = elector(redis_url, key_prefix, name, "a")
    b = elector(redis_url, key_prefix, name, "b")
    a.start()
    b.start()
    try:
        wait_for("a leader", lambda: a.is_leader() or b.is_leader())
        leader = a if a.is_leader() else b
        follower = b if leader is a else a
        both = 0
        samples = 0
        end = time.monotonic() + 8 * leader.renew_interval_s  # eight renewals
        while time.monotonic() < end:
            la, lb = a.is_leader(), b.is_leader()
            both += la and lb
            samples += 1
            time.sleep(0.002)
        assert samples > 100
        assert both == 0, f"both electors were leader in {both} of {samples} samples"
        # The holder renewed throughout: it never lost the lease, the follower never got it.
        assert leader.is_leader()
        assert leader.state().transitions == 1
        assert follower.state().transitions == 0
        assert client.get(leader.key) == leader.owner
    finally:
        a.stop()
        b.stop()


def test_takeover_within_two_leases_after_leader_process_is_killed(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    lease_s = 1.5
    key = f"{key_prefix}leader:{name}"
    script = (
        "import sys, time\n"
        "from scaler.leader import LeaderLease\n"
        "lease = LeaderLease.from_url(sys.argv[1], name=sys.argv[2], prefix=sys.argv[3],\n"
        "                             owner='doomed', lease_s=float(sys.argv[4]))\n"
        "lease.start()\n"
        "while True: time.sleep(1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, redis_url, name, key_prefix, str(lease_s)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    survivor = elector(redis_url, key_prefix, name, "survivor", lease_s=lease_s)
    try:
        wait_for("the subprocess to take the lease", lambda: client.get(key) == "doomed", 30)
        survivor.start()
        # While the other process lives and renews, the survivor never leads.
        end = time.monotonic() + 2 * lease_s
        while time.monotonic() < end:
            assert not survivor.is_leader(), "follower led while the leader was alive"
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        took = wait_for("the survivor to take over", survivor.is_leader, 10 * lease_s)
        assert took < 2 * lease_s, f"takeover took {took:.2f}s, more than two leases"
        assert client.get(key) == "survivor"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        survivor.stop()


def test_takeover_after_renewals_stop_never_overlaps(
    redis_url: str, key_prefix: str, name: str
) -> None:
    a = elector(redis_url, key_prefix, name, "a")
    b = elector(redis_url, key_prefix, name, "b")
    a.start()
    wait_for("a to lead", a.is_leader)
    b.start()
    try:
        a.stop(release=False)  # a hung or crashed scaler: the lease is left to expire
        stopped = time.monotonic()
        overlap = False
        while not b.is_leader():
            overlap |= a.is_leader() and b.is_leader()
            assert time.monotonic() - stopped < 10 * LEASE_S, "b never took over"
            time.sleep(0.002)
        assert not overlap
        assert not a.is_leader(), "a still counted itself leader after b took over"
        assert time.monotonic() - stopped < 2 * LEASE_S
    finally:
        b.stop()


def test_clean_stop_releases_so_the_follower_need_not_wait_for_expiry(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    # A long lease: if release did not work, takeover would take ~10 s and the test fails.
    a = elector(redis_url, key_prefix, name, "a", lease_s=10)
    b = elector(redis_url, key_prefix, name, "b", lease_s=10)
    assert a.step()
    assert not b.step()
    a.stop(release=True)
    assert not a.is_leader()
    assert client.get(a.key) is None
    assert b.step()


def test_leadership_ends_by_local_clock_before_redis_expires_the_key(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    # A 5 s lease: its safety margin (1 s) is what the key outlives the step-down by, far more
    # than a loaded machine's pause between the step-down and the PTTL read (CI read -2 with a
    # short lease).
    a = elector(redis_url, key_prefix, name, "a", lease_s=5.0)
    assert a.step()  # acquired once and never renewed
    ttl_ms = 0

    def stepped_down() -> bool:
        nonlocal ttl_ms
        if a.is_leader():
            return False
        ttl_ms = client.pttl(a.key)  # type: ignore[assignment]  # sync client
        return True

    wait_for("a to stop counting itself leader", stepped_down, 10)
    # The key is still alive: a stepped down before anyone else could have been given it.
    assert ttl_ms > 0


def test_renewal_fails_once_someone_else_owns_the_key(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    a = elector(redis_url, key_prefix, name, "a")
    assert a.step()
    client.set(a.key, "intruder", px=5000)  # e.g. a's lease expired and another took it
    assert not a.step()
    assert not a.is_leader()
    assert a.release() is False  # compare-and-del leaves the other owner's lease alone
    assert client.get(a.key) == "intruder"


class OwnRedis:
    """A redis-server of this test's own on a free port, to kill and restart. Falls back to a
    container from REDIS_IMAGE when no redis-server binary is installed."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._container: str | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        args = ["--save", "", "--appendonly", "no"]
        if binary:
            self._proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            image = os.environ.get("REDIS_IMAGE", "redis:7")
            self._container = f"leader-test-redis-{uuid.uuid4().hex[:8]}"
            publish = f"127.0.0.1:{self.port}:6379"
            run = ["docker", "run", "-d", "--rm", "--name", self._container, "-p", publish]
            subprocess.run(
                [*run, image, "redis-server", *args],
                check=True,
                capture_output=True,
            )

        def ready() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
            except redis.RedisError:
                return False

        wait_for(f"own redis on port {self.port}", ready, 30)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        if self._container is not None:
            subprocess.run(["docker", "rm", "-f", self._container], capture_output=True)
            self._container = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_down_means_nobody_leads_and_leadership_returns_after(
    own_redis: OwnRedis, name: str
) -> None:
    a = elector(own_redis.url, "", name, "a")
    b = elector(own_redis.url, "", name, "b")
    a.start()
    b.start()
    try:
        wait_for("a leader", lambda: a.is_leader() or b.is_leader())
        own_redis.kill()
        wait_for("nobody to lead", lambda: not a.is_leader() and not b.is_leader(), 5)
        wait_for("the error to be reported", lambda: a.last_error is not None, 5)
        assert "redis error" in (a.last_error or "")
        assert not a.state().leader and not b.state().leader
        own_redis.start()  # same port: the electors reconnect by themselves
        wait_for("a leader again", lambda: a.is_leader() or b.is_leader(), 10)
        assert not (a.is_leader() and b.is_leader())
        wait_for("errors to clear", lambda: a.last_error is None and b.last_error is None, 5)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lease_s": 0}, "lease_s"),
        ({"lease_s": -1}, "lease_s"),
        ({"lease_s": 3, "safety_s": 2.5}, "safety_s"),
        ({"lease_s": 3, "safety_s": -0.1}, "safety_s"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(
    client: redis.Redis, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        LeaderLease(client, **kwargs)  # type: ignore[arg-type]


def test_lease_settings_from_the_environment() -> None:
    assert LeaseSettings.from_env({}) == LeaseSettings("scaler", "", 15.0)
    got = LeaseSettings.from_env(
        {"SCALER_LEASE_NAME": "blue", "SCALER_KEY_PREFIX": "prod:", "SCALER_LEASE_S": "6"}
    )
    assert got == LeaseSettings("blue", "prod:", 6.0)
    for bad in ("soon", "0.5", "nan", "9999"):
        with pytest.raises(ValueError, match=f"SCALER_LEASE_S .* got '{bad}'"):
            LeaseSettings.from_env({"SCALER_LEASE_S": bad})


def test_each_acquisition_is_a_new_generation_and_older_fences_refuse(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    a = elector(redis_url, key_prefix, name, "a", lease_s=5)
    b = elector(redis_url, key_prefix, name, "b", lease_s=5)
    assert a.step()
    first = a.current_generation()
    assert first is not None and client.get(a.generation_key) == str(first)
    fence = a.fence()
    fence.check("an action under a's first lease")  # valid: no exception
    assert a.step() and a.current_generation() == first, "a renewal keeps the generation"

    a.release()
    with pytest.raises(LeadershipLost, match="not the leader"):
        fence.check("stop worker-io-2")
    assert b.step() and b.current_generation() == first + 1
    b.release()
    assert a.step() and a.current_generation() == first + 2
    # a leads again, but the action begun under its first lease must not resume.
    with pytest.raises(LeadershipLost, match=f"generation is now {first + 2}"):
        fence.check("stop worker-io-2")
    a.fence().check("a new action under the new lease")
    assert a.state().refused_actions == 2 and a.state().generation == first + 2
    with pytest.raises(LeadershipLost):
        b.fence().check("b is not leader: a fence taken now refuses at once")
    a.release()


# -- issue 18: the lease's slack is used; a hung loop loses the lease in bounded time -------------


def test_a_failed_renewal_is_retried_and_leadership_ends_only_when_the_lease_may_lapse(
    own_redis: OwnRedis, name: str
) -> None:
    """A Redis error during a renewal (here Redis refusing the renewal script) keeps leadership,
    under the same generation, so no action begun before it is aborted. Only when the last
    successful renewal can no longer be valid does the replica step down: before Redis could
    expire the key and hand it to anyone else."""
    a = elector(own_redis.url, "", name, "a", lease_s=3)
    admin = redis.Redis.from_url(own_redis.url, decode_responses=True, socket_timeout=2)
    assert a.step()
    fence = a.fence()
    admin.execute_command("ACL", "SETUSER", "default", "-eval", "-evalsha")
    try:
        assert a.step(), f"one failed renewal ended leadership ({a.last_error})"
        assert "redis error" in (a.last_error or "")
        fence.check("a drain begun before the failed renewal")  # does not raise
        assert a.state().transitions == 1
        # Every renewal fails from now on: a steps down by its own clock, the key still alive.
        wait_for("a to step down", lambda: not a.step(), 10)
        ttl_ms: int = admin.pttl(a.key)  # type: ignore[assignment]  # sync client
        assert ttl_ms > 0, "a counted itself leader after Redis could have expired the key"
        with pytest.raises(LeadershipLost):
            fence.check("an action after the lease may have lapsed")
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+eval", "+evalsha")
        admin.close()
    assert a.step() and a.last_error is None  # the key was still a's: renewed, same generation
    a.fence().check("after Redis recovered")


def test_a_renewal_slower_than_the_client_timeout_does_not_end_leadership(
    own_redis: OwnRedis, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Right after a renewal, Redis holds every write (CLIENT PAUSE) for 0.65 of a lease: the
    next renewal, due a third of a lease on, hangs past the client's timeout. The lease sent
    before the pause is valid for 0.8 of a lease, so the renewer retries and the leader never
    stops leading; its drains' fences stay valid."""
    lease_s = 4.0
    a = elector(own_redis.url, "", name, "a", lease_s=lease_s)
    admin = redis.Redis.from_url(own_redis.url, decode_responses=True, socket_timeout=2)
    caplog.set_level("WARNING", logger="scaler.leader")
    a.start()
    try:
        wait_for("a to lead", a.is_leader)
        fence, generation = a.fence(), a.current_generation()

        def fresh() -> bool:  # a renewal landed within the last 50 ms
            return int(admin.pttl(a.key)) > (lease_s - 0.05) * 1000  # type: ignore[arg-type]

        wait_for("a fresh renewal", fresh)
        pause_s = 0.65 * lease_s
        paused_at = time.monotonic()
        admin.execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "WRITE")
        samples = lapses = 0
        # Sample leadership through the pause until a renewal after it has landed.
        while not (time.monotonic() - paused_at > pause_s and fresh()):
            assert time.monotonic() - paused_at < 3 * lease_s, "no renewal after the pause"
            samples += 1
            lapses += not a.is_leader()
            time.sleep(0.005)
        slow = [r.getMessage() for r in caplog.records if "redis error" in r.getMessage()]
        assert slow, "no renewal failed during the pause: the test did not test anything"
        assert samples > 100 and lapses == 0, f"not leader in {lapses} of {samples} samples"
        assert "still leader" in slow[0], slow[0]
        assert a.state().transitions == 1
        assert a.current_generation() == generation
        fence.check("a drain begun before the slow renewal")  # does not raise
    finally:
        a.stop()
        admin.close()


def test_a_hung_loop_loses_the_lease_within_its_budget_plus_the_safety_margin(
    redis_url: str, key_prefix: str, name: str, client: redis.Redis
) -> None:
    """The loop says a cycle starts and must end within ``budget``, then hangs. By the deadline
    the replica no longer counts itself leader, and the key is gone from Redis within the
    safety margin after it (the TTLs set near the deadline end there; the renewer wakes at it),
    so the standby takes over within a third of a lease more (docs/scaler-operations.md)."""
    lease_s, budget_s = 2.0, 1.0
    a = elector(redis_url, key_prefix, name, "a", lease_s=lease_s)
    b = elector(redis_url, key_prefix, name, "b", lease_s=lease_s)
    a.start()
    try:
        wait_for("a to lead", a.is_leader)
        b.start()
        a.expect_progress(budget_s)  # a cycle starts...
        hung_at = time.monotonic()  # ...and never ends
        led_past_deadline = 0
        while client.get(a.key) == "a":
            elapsed = time.monotonic() - hung_at
            assert elapsed < 5 * lease_s, "a kept the key"
            led_past_deadline += elapsed > budget_s and a.is_leader()
            time.sleep(0.002)
        lost = time.monotonic() - hung_at
        bound = budget_s + a.safety_s
        print(f"hung loop: key gone {lost:.3f} s after the cycle began (bound {bound:.2f} s)")
        assert led_past_deadline == 0, "a counted itself leader after its loop's deadline"
        assert lost <= bound + 0.25, f"key gone {lost:.2f} s after the hang, bound {bound:.2f} s"
        assert not a.is_leader() and "loop stalled" in (a.last_error or "")
        wait_for("b to take over", b.is_leader, 2 * lease_s)
        took = time.monotonic() - hung_at
        print(f"hung loop: standby led {took:.3f} s after (bound {bound + lease_s / 3:.2f} s)")
        assert took <= bound + lease_s / 3 + 0.25
    finally:
        a.stop()
        b.stop()
