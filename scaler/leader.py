"""Leader election between scaler replicas: one Redis lease, renewed by its holder.

Two scalers may run for availability, but only one may act: two actors would fight over replica
counts. The lease is a Redis key holding the owner's id with a TTL:

- acquire: ``SET key owner NX PX lease_ms`` (only when nobody holds it) and, in the same Lua
  call, ``INCR key:generation``: the lease's generation, a fencing token (``scaler.fencing``);
- renew: a Lua compare-and-pexpire (only while we are still the owner), which also reads the
  generation back (a changed one makes every action begun under the old one stop);
- release on a clean stop: a Lua compare-and-del (never deletes someone else's lease).

Leadership is judged by the local clock, conservatively: we count ourselves leader only until
``send time of the last successful acquire/renew + its TTL - safety`` (the TTL is the lease, or
less near a progress deadline, below), so leadership ends before Redis could hand the key to
anyone else, measured from when the call was sent, however late its answer came. Within that
time a failed or timed-out renewal is not the end: it is retried every ``lease / 30`` until it
succeeds or the lease can no longer be valid, so one slow call or one Redis error aborts nothing
(the client's timeout, ``lease / 10``, leaves room for several attempts). Leadership ends at once
only when Redis says the key is someone else's (or nobody's). The holder renews every
``lease / 3``, and a follower tries at the same pace, so after a leader dies the key expires
within one lease and the follower takes it within ``lease + lease / 3`` (under two lease periods).

The lease is held for a loop that works, not for a process that merely runs: the loop calls
:meth:`LeaderLease.expect_progress` when a cycle starts (it must end within the loop's stall
budget) and when it ends (the next one must end within the next delay plus that budget). That
deadline bounds the lease: no acquire or renewal sets a TTL past ``deadline + safety``, we count
ourselves leader only until the deadline, and the renewer wakes at it, records ``loop stalled``
and neither renews nor acquires any more. A loop hung in a cycle therefore loses the key at most
``budget + safety`` after that cycle began (with the default budget, ``lease - safety``: one
lease, as if the process had died when the cycle began), even when Redis cannot be reached.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from scaler.fencing import LeaseFence

log = logging.getLogger(__name__)

# KEYS[1] = lease key, KEYS[2] = generation key, ARGV[1] = owner, ARGV[2] = lease in ms.
# The generation (>= 1) if renewed, 0 if not ours. A generation key lost while we hold the lease
# (a flush) is bumped: a generation is never handed out twice to two holders.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local generation = redis.call('GET', KEYS[2])
  if not generation then
    return redis.call('INCR', KEYS[2])
  end
  return tonumber(generation)
end
return 0
"""

# Same keys and arguments: the new generation if acquired, 0 if someone holds the lease.
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""

# KEYS[1] = lease key, ARGV[1] = owner. 1 if deleted, 0 if not ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class LeaseSettings:
    """The lease's settings from the environment, so every replica is configured the same way."""

    name: str = "scaler"
    prefix: str = ""
    lease_s: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LeaseSettings:
        """SCALER_LEASE_NAME (default "scaler"), SCALER_KEY_PREFIX (default ""), SCALER_LEASE_S
        (default 15; takeover after a leader dies takes at most ~1.33 of it)."""
        env = os.environ if env is None else env
        name = env.get("SCALER_LEASE_NAME", "").strip() or "scaler"
        raw = env.get("SCALER_LEASE_S", "").strip() or "15"
        try:
            lease_s = float(raw)
        except ValueError:
            lease_s = math.nan
        if not 1.0 <= lease_s <= 600.0:
            raise ValueError(f"SCALER_LEASE_S must be a number of seconds in [1, 600], got {raw!r}")
        return cls(name=name, prefix=env.get("SCALER_KEY_PREFIX", ""), lease_s=lease_s)


def default_owner_id() -> str:
    """Unique per elector, readable in ``redis-cli GET``: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class LeaseState:
    """A snapshot for status and metrics."""

    key: str
    owner: str
    leader: bool
    valid_for_s: float  # how much longer we count ourselves leader (0 when not leader)
    last_error: str | None
    transitions: int  # times leadership was gained or lost
    generation: int | None = None  # the fencing token of our lease (None when not leader)
    refused_actions: int = 0  # actions a fence stopped because the lease was lost

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "owner": self.owner,
            "leader": self.leader,
            "valid_for_s": round(self.valid_for_s, 3),
            "last_error": self.last_error,
            "transitions": self.transitions,
            "generation": self.generation,
            "refused_actions": self.refused_actions,
        }


class LeaderLease:
    """One elector. Call :meth:`start` to keep trying/renewing in a daemon thread, or drive
    :meth:`step` yourself; ask :meth:`is_leader` right before acting."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str = "scaler",
        prefix: str = "",
        owner: str | None = None,
        lease_s: float = 15.0,
        safety_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not name:
            raise ValueError("leader lease name must be a non-empty string, got ''")
        if not lease_s > 0:
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        safety = lease_s * 0.2 if safety_s is None else safety_s
        # The safety margin must leave time to renew: renewals come every lease/3.
        if not 0 <= safety < lease_s * 2 / 3:
            raise ValueError(
                f"safety_s must be in [0, {lease_s * 2 / 3:.3f}) for lease_s={lease_s}, "
                f"got {safety_s!r}"
            )
        self.client = client
        self.key = f"{prefix}leader:{name}"
        self.generation_key = f"{self.key}:generation"
        self.owner = owner or default_owner_id()
        self.lease_s = lease_s
        self.safety_s = safety
        self.renew_interval_s = lease_s / 3
        self.retry_interval_s = lease_s / 30  # after a failed renewal, while the key may be ours
        self._lease_ms = max(1, int(lease_s * 1000))
        self._clock = clock
        self._renew = client.register_script(_RENEW_LUA)
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._lock = threading.Lock()
        self._valid_until = 0.0  # local clock; leader while clock() < this (and the deadline)
        self._sent_at = 0.0  # when the last successful acquire/renew was sent
        self._expires_at = 0.0  # its send time + TTL: Redis keeps the key at least until then
        self._capped_by: float | None = None  # the progress deadline that shortened that TTL
        self._attempt_at = 0.0  # when the last step began
        self._failing = False  # the last step failed (a Redis error), not a refusal
        self._was_leader = False
        self._transitions = 0
        self._generation: int | None = None  # of the lease we last acquired or renewed
        self._progress_until: float | None = None  # None: nobody asked for progress
        self._refused = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the renewer re-plans (progress reported, stop)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, url: str, settings: LeaseSettings) -> LeaderLease:
        return cls.from_url(
            url, name=settings.name, prefix=settings.prefix, lease_s=settings.lease_s
        )

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> LeaderLease:
        """Build with a client whose timeouts (a tenth of the lease) leave room for several
        renewal attempts between the due renewal (``lease / 3``) and the end of validity."""
        lease_s = float(kwargs.get("lease_s", 15.0))
        timeout = max(0.05, lease_s / 10)
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        return cls(client, **kwargs)

    # -- the question the loop asks -------------------------------------------------------------

    def is_leader(self) -> bool:
        """True only while the last successful acquire/renew still covers us by the local clock
        and the loop's progress deadline has not passed."""
        with self._lock:
            return self._valid_for(self._clock()) > 0

    def _valid_for(self, now: float) -> float:
        """Seconds of leadership left (<= 0: not leader). Call with the lock held."""
        until = self._valid_until
        if self._progress_until is not None:
            until = min(until, self._progress_until)
        return until - now

    def current_generation(self) -> int | None:
        """The lease's generation while we are leader by the local clock, else None."""
        with self._lock:
            return self._generation if self._valid_for(self._clock()) > 0 else None

    def fence(self) -> LeaseFence:
        """A fence for an action starting now: valid while this leadership lasts, under this
        generation (``scaler.fencing``); refuses at once if we are not leader."""
        return LeaseFence(self, self.current_generation())

    def note_refused(self, message: str) -> None:
        """A fence refused an action (``message``: which and why): counted for status, logged."""
        with self._lock:
            self._refused += 1
        log.warning("leader lease %s: fenced: %s", self.key, message)

    def expect_progress(self, within_s: float) -> None:
        """The loop is alive and will call again within ``within_s``; until then renew. Past
        that deadline we are not leader, and no TTL we set reaches past it by more than the
        safety margin."""
        with self._lock:
            self._progress_until = self._clock() + within_s
        self._wake.set()  # the renewer re-plans: a deadline that moved may call for a renewal

    def stalled(self) -> bool:
        """True when the loop promised progress and did not make it: the lease is let lapse."""
        with self._lock:
            until = self._progress_until
        return until is not None and self._clock() > until

    def holder(self) -> str | None:
        """Who holds the lease key now (any replica), None if nobody or Redis cannot say."""
        try:
            value = self.client.get(self.key)
        except (redis.RedisError, OSError):
            return None
        if isinstance(value, bytes):
            return value.decode()
        return None if value is None else str(value)

    def state(self) -> LeaseState:
        with self._lock:
            remaining = self._valid_for(self._clock())
            return LeaseState(
                key=self.key,
                owner=self.owner,
                leader=remaining > 0,
                valid_for_s=max(0.0, remaining),
                last_error=self.last_error,
                transitions=self._transitions,
                generation=self._generation if remaining > 0 else None,
                refused_actions=self._refused,
            )

    # -- one election step ----------------------------------------------------------------------

    def step(self) -> bool:
        """Renew if we hold the lease, otherwise try to take it. Returns :meth:`is_leader`.

        Neither while the loop is stalled (:meth:`expect_progress`): the lease then lapses. A
        Redis error leaves leadership to run out by the local clock (the caller retries).
        """
        started = self._clock()  # before the call: the server's TTL starts later than this
        with self._lock:
            self._attempt_at = started
            until = self._progress_until
        if until is not None and started >= until:
            self._record(0, started, "loop stalled: no cycle completed in time; lease not renewed")
            return False
        ttl_ms = self._lease_ms
        if until is not None:  # the key must not outlive the deadline by more than the margin
            ttl_ms = max(1, min(ttl_ms, int((until - started + self.safety_s) * 1000)))
        keys = [self.key, self.generation_key]
        args: list[str | int] = [self.owner, ttl_ms]
        try:
            generation = int(self._renew(keys=keys, args=args))
            if not generation:
                generation = int(self._acquire(keys=keys, args=args))
        except (redis.RedisError, OSError) as exc:
            self._record_failure(f"redis error: {type(exc).__name__}: {exc}")
            return self.is_leader()
        capped_by = until if ttl_ms < self._lease_ms else None
        self._record(generation, started, None, ttl_ms / 1000, capped_by)
        return self.is_leader()

    def release(self) -> bool:
        """Give the lease up now (clean stop), so a follower need not wait for it to expire."""
        with self._lock:
            self._valid_until = 0.0
            self._failing = False
        try:
            released = bool(self._release(keys=[self.key], args=[self.owner]))
        except (redis.RedisError, OSError) as exc:
            self.last_error = f"release failed: {type(exc).__name__}: {exc}"
            log.warning("leader lease %s: %s", self.key, self.last_error)
            return False
        self._note_transition(False)
        return released

    def _record(
        self,
        generation: int,
        started: float,
        error: str | None,
        ttl_s: float = 0.0,
        capped_by: float | None = None,
    ) -> None:
        """``generation`` 0: not held (the key is someone else's or nobody's, or we stalled):
        leadership ends now. Otherwise held for ``ttl_s`` from ``started`` (the send time)."""
        with self._lock:
            self._failing = False
            if generation:
                self._valid_until = started + ttl_s - self.safety_s
                self._sent_at, self._expires_at = started, started + ttl_s
                self._capped_by = capped_by
                self._generation = generation
            else:
                self._valid_until = 0.0
            quiet = error is not None and error == self.last_error
            self.last_error = error
            leader = self._valid_for(self._clock()) > 0
        if error and not quiet:
            log.warning("leader lease %s: %s; not leader", self.key, error)
        self._note_transition(leader)

    def _record_failure(self, error: str) -> None:
        """A call failed: nothing is known about the key, so leadership runs on until the last
        successful renewal can no longer be valid; meanwhile the renewer retries."""
        with self._lock:
            self._failing = True
            quiet = error == self.last_error
            self.last_error = error
            left = self._valid_for(self._clock())
        if not quiet:
            then = f"still leader for {left:.2f} s, retrying" if left > 0 else "not leader"
            log.warning("leader lease %s: %s; %s", self.key, error, then)
        self._note_transition(left > 0)

    def _next_step_in(self) -> float:
        """Seconds until the renewer's next step."""
        with self._lock:
            now = self._clock()
            until = self._progress_until
            if self._failing and now < self._expires_at:  # the key may still be ours: retry
                due = self._attempt_at + self.retry_interval_s
            elif now < self._valid_until:
                due = self._sent_at + self.renew_interval_s
                if until is not None:
                    if self._capped_by is not None and until > self._capped_by:
                        due = now  # the loop moved on: a TTL the deadline had cut can be longer
                    if self._expires_at > until + self.safety_s + 0.001:
                        due = now  # the deadline came closer: shorten the key's TTL to match
            else:  # a follower, a stalled loop, or Redis gone: try at the renewal pace
                due = self._attempt_at + self.renew_interval_s
            if until is not None and self._attempt_at < until:
                due = min(due, until)  # at the deadline: record the stall at once
            return due - now

    def _note_transition(self, leader: bool) -> None:
        with self._lock:
            if leader == self._was_leader:
                return
            self._was_leader = leader
            self._transitions += 1
        log.info(
            "leader lease %s: %s is %s", self.key, self.owner, "leader" if leader else "follower"
        )

    # -- background renewal ---------------------------------------------------------------------

    def start(self) -> None:
        """Try/renew every ``lease / 3`` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError(f"leader lease {self.key} for {self.owner} already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"leader-lease-{self.owner}", daemon=True
        )
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release`` give the lease up at once. ``release=False`` leaves it
        to expire, which is what a crash looks like to the other replicas."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_s + 5)
            self._thread = None
        if release:
            self.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self.step()
            while not self._stop.is_set():
                delay = self._next_step_in()
                if delay <= 0:
                    break
                if self._wake.wait(delay):
                    self._wake.clear()  # re-plan: progress was reported, or stop
