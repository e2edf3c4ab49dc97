"""The warm pool's mechanics, shared by the Compose and local backends (its plan, the pure
arithmetic below, by the simulator too).

A warm replica is a worker booted and healthy but consuming nothing (the policy's ``warm``). A
scale-up promotes one (``add_consumer`` of its service's queues, confirmed by the worker: a few
milliseconds) before it starts a cold one (a container or process start plus a Celery boot:
over a second); a scale-down returns a drained replica to the pool while the pool is short,
before it stops any; the pool is then refilled with replicas started warm, or trimmed.

Membership must survive a scaler restart and a leader change, and Docker labels cannot change
after creation, so it lives in Redis: one set per service, ``{prefix}scaler:warm:<service>``,
holding member ids the backend chooses (container ids for Compose: known at creation, never
reused; node names for the local backend). The scaler's Redis user may write ``scaler:*``, the
workers' may not: a compromised worker can neither hide a replica in the pool nor pull one out.
Without a Redis (a RabbitMQ-only deployment) the pool lives in memory and a restarted scaler
treats its former members as serving (the stranded-worker rule gives them their queues).

Rules:
- A member is *ready* once it answered and consumes nothing (checked by a background watch
  thread per booting member: ``WORKER_WARM_START=1`` makes the worker boot without consuming,
  ``services.warm_start``; a worker without that step is cancelled here once it answers). Only
  ready members are promoted; booting ones count as warm (the decision core's ``warm``).
- A promote leaves the member in the set until every ``add_consumer`` is confirmed; a failed one
  is reported and the member stays warm (the cold start covers the scale-up).
- A scale-up that needs more than the ready members, while the pool must shrink (serving + warm
  within max), *commits* booting members the pool would lose: out of the set at once (serving
  from now on, in the count) and given their consumers by their watch once they answer. Starting
  a cold replica and stopping the booting member instead would run one container over max for
  the seconds its stop takes, and the booting member is no later than a cold start would be.
  A committed member whose watch ends unanswered (a scaler restart, a boot timeout) is a serving
  worker consuming nothing: the stranded-worker rule gives it its queues.
- Every reconcile asks the ready members which queues they consume (one ``active_queues``
  request, answered in milliseconds): one whose consumer came back is cancelled again if it
  holds no task, else it leaves the pool and counts as serving; both are reported.
- Members whose worker is gone are dropped from the set (``prune``); a pool member is never
  given its queues back by the stranded-worker rule (the backends leave members out of it).
- Every mutating call (set writes, cancel, add) checks the action's fence first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from scaler.backends.base import BackendError, BackendEvent
from scaler.fencing import Fence, LeadershipLost

log = logging.getLogger(__name__)

POOL_KEY = "scaler:warm:"
WARM_ENV = "WORKER_WARM_START"  # read by services.warm_start in the worker

M = TypeVar("M")


# -- the pool's plan: pure arithmetic, the same for every backend and the simulator -------------
# The rules of the module docstring as numbers. Each backend (and scaler.simulate, which models
# them) calls these rather than restating them, so a change to the rule is made once.


def commit_count(need: int, booting: int, members: int, warm: int) -> int:
    """Booting members a scale-up takes as serving after promoting the ready ones: at most
    ``need`` (still short), ``booting`` (there are no more) and what the pool would lose anyway
    (``members``, counting drains on their way in, over ``warm``): serving + warm within max."""
    return max(0, min(need, booting, members - warm))


def pool_room(warm: int, members: int) -> int:
    """How many of a scale-down's drained replicas return to the pool (the rest are stopped):
    what the pool is short of ``warm``."""
    return max(0, warm - members)


def pool_target(warm: int, after: int, desired: int) -> int:
    """The pool's size after a scale: busy replicas a scale-down could not remove (``after``
    over ``desired``) take the pool's room, so serving + warm stays within what was decided."""
    return max(0, warm - max(0, after - desired))


def trim_order(
    members: Iterable[M], booted: Callable[[M], bool], number: Callable[[M], int]
) -> list[M]:
    """Members in the order a shrinking pool stops them: booting ones first (nothing to lose
    yet), then the highest-numbered."""
    return sorted(members, key=lambda m: (booted(m), -number(m)))


class PoolStore(Protocol):
    """Where pool membership lives (per service, a set of member ids)."""

    def members(self, service: str) -> set[str]: ...

    def add(self, service: str, member: str) -> None: ...

    def discard(self, service: str, member: str) -> None: ...


class RedisPoolStore:
    """Membership in Redis sets ``{prefix}scaler:warm:<service>`` (the scaler's own keys)."""

    def __init__(self, client: Any, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "") -> RedisPoolStore:
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), prefix)

    def key(self, service: str) -> str:
        return f"{self.prefix}{POOL_KEY}{service}"

    def members(self, service: str) -> set[str]:
        try:
            raw = self.client.smembers(self.key(service))
        except Exception as exc:
            raise BackendError(f"read warm pool {self.key(service)}: {exc}") from exc
        return {m.decode() if isinstance(m, bytes) else str(m) for m in raw}

    def add(self, service: str, member: str) -> None:
        try:
            self.client.sadd(self.key(service), member)
        except Exception as exc:
            raise BackendError(f"add {member} to warm pool {self.key(service)}: {exc}") from exc

    def discard(self, service: str, member: str) -> None:
        try:
            self.client.srem(self.key(service), member)
        except Exception as exc:
            raise BackendError(f"remove {member} from {self.key(service)}: {exc}") from exc


@dataclass
class MemoryPoolStore:
    """Membership in this process only: lost with it (used when there is no Redis)."""

    sets: dict[str, set[str]] = field(default_factory=dict)

    def members(self, service: str) -> set[str]:
        return set(self.sets.get(service, ()))

    def add(self, service: str, member: str) -> None:
        self.sets.setdefault(service, set()).add(member)

    def discard(self, service: str, member: str) -> None:
        self.sets.get(service, set()).discard(member)


def _confirmed(replies: Any, node: str) -> bool:
    return any(node in reply for reply in replies or [])


def consumed_queues(app: Any, nodes: Sequence[str], timeout_s: float) -> dict[str, list[str]]:
    """Queues each answering node consumes (nodes that do not answer are left out)."""
    if not nodes:
        return {}
    inspect = app.control.inspect(destination=list(nodes), timeout=timeout_s, limit=len(nodes))
    replies = inspect.active_queues() or {}
    return {n: [str(q.get("name")) for q in replies[n] or []] for n in nodes if n in replies}


def holds_tasks(app: Any, node: str, timeout_s: float) -> bool | None:
    """True if ``node`` runs or holds a task, False if idle, None if it did not answer."""
    inspect = app.control.inspect(destination=[node], timeout=timeout_s, limit=1)
    active, reserved = inspect.active() or {}, inspect.reserved() or {}
    if node not in active or node not in reserved:
        return None
    return bool(active[node]) or bool(reserved[node])


# A confirmation waits at least this long. A live worker answers in milliseconds (the broadcast
# returns at its one reply), but on a loaded host a worker busy booting or running a CPU-bound
# task may take a second or more; giving up sooner turns a promotion into a cold start (and a
# demotion into a worker that keeps consuming) for nothing. Only a hung worker costs the wait.
CONFIRM_TIMEOUT_S = 3.0


def set_consumers(
    app: Any, node: str, queues: Sequence[str], *, add: bool, fence: Fence, timeout_s: float
) -> str | None:
    """``add_consumer`` (or ``cancel_consumer``) of each queue on ``node``, each confirmed by
    the worker (waiting at least ``CONFIRM_TIMEOUT_S``); None when all were, else what failed.
    Fenced before each call."""
    timeout_s = max(timeout_s, CONFIRM_TIMEOUT_S)
    verb = "add" if add else "cancel"
    failed: list[str] = []
    for queue in queues:
        fence.check(f"{verb} {node}'s consumer of {queue}")
        command = app.control.add_consumer if add else app.control.cancel_consumer
        try:
            replies = command(queue, destination=[node], reply=True, timeout=timeout_s)
        except Exception as exc:
            failed.append(f"{queue} ({type(exc).__name__}: {exc})")
            continue
        if not _confirmed(replies, node):
            failed.append(f"{queue} (no reply)")
    return f"{verb}_consumer not confirmed: {', '.join(failed)}" if failed else None


@dataclass
class WarmPool:
    """Membership (in ``store``), readiness and the broker side of promote and demote."""

    app: Any
    store: PoolStore = field(default_factory=MemoryPoolStore)
    timeout_s: float = 1.0
    boot_timeout_s: float = 180.0  # a member that never answers is reported and left to prune
    poll_s: float = 0.2
    _ready: dict[str, str] = field(default_factory=dict, init=False)  # member -> node name
    _committed: set[str] = field(default_factory=set, init=False)  # booting, taken as serving
    _watching: dict[str, threading.Thread] = field(default_factory=dict, init=False)
    _events: list[BackendEvent] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    # -- membership ---------------------------------------------------------------------------
    def members(self, service: str) -> set[str]:
        """The service's members as stored; BackendError when the store cannot be read."""
        return self.store.members(service)

    def node(self, member: str) -> str | None:
        """The node name of a ready member (None while it boots or is unchecked)."""
        with self._lock:
            return self._ready.get(member)

    def committed(self) -> set[str]:
        """Booting members taken as serving whose watch has not given them consumers yet (the
        consumer check leaves them to their watch)."""
        with self._lock:
            return set(self._committed)

    def ready(self, members: Sequence[str]) -> list[str]:
        with self._lock:
            return [m for m in members if m in self._ready]

    def enlist(self, service: str, member: str, fence: Fence) -> None:
        """Record a replica started for the pool (before it boots: never taken for serving)."""
        fence.check(f"add {member} to {service}'s warm pool")
        self.store.add(service, member)

    def admit(self, service: str, member: str, node: str, fence: Fence) -> None:
        """Record a drained replica (consumers cancelled, idle) as warm and ready at once."""
        fence.check(f"return {node} to {service}'s warm pool")
        self.store.add(service, member)
        with self._lock:
            self._ready[member] = node

    def leave(self, service: str, member: str) -> None:
        """Drop ``member`` from the pool (promoted, stopped, gone)."""
        self.store.discard(service, member)
        self.forget(member)

    def forget(self, member: str) -> None:
        with self._lock:
            self._ready.pop(member, None)

    def prune(self, service: str, alive: set[str], fence: Fence) -> list[str]:
        """Drop stored members whose worker is gone (not in ``alive``); the ids dropped."""
        gone = sorted(self.members(service) - alive)
        for member in gone:
            fence.check(f"drop {member} (gone) from {service}'s warm pool")
            self.leave(service, member)
        return gone

    def commit(
        self,
        service: str,
        member: str,
        resolve: Callable[[], str | None],
        queues: Sequence[str],
        fence: Fence,
    ) -> bool:
        """Take a booting member as serving: out of the set now, consumers added by its watch
        once it answers (module docstring); one that answered meanwhile is promoted. False when
        it is not serving (a failed promotion: it stays warm)."""
        fence.check(f"take booting {member} of {service}'s warm pool as serving")
        with self._lock:
            ready = member in self._ready  # it answered since the caller looked: promote it
            if not ready:
                self._committed.add(member)
        if ready:
            return self.promote(service, member, queues, fence) is None
        self.store.discard(service, member)
        self.watch(service, member, resolve, queues, fence)
        return True

    # -- booting members ---------------------------------------------------------------------
    def watch(
        self,
        service: str,
        member: str,
        resolve: Callable[[], str | None],
        queues: Sequence[str],
        fence: Fence,
    ) -> None:
        """Until ``member`` answers (``resolve`` returns its node name once it does), in a
        background thread; then make sure it consumes none of ``queues`` and mark it ready."""
        with self._lock:
            running = self._watching.get(member)
            if member in self._ready or (running is not None and running.is_alive()):
                return
            thread = threading.Thread(
                target=self._watch,
                args=(service, member, resolve, tuple(queues), fence),
                name=f"warm-{member[:20]}",
                daemon=True,
            )
            self._watching[member] = thread
        thread.start()

    def _watch(
        self,
        service: str,
        member: str,
        resolve: Callable[[], str | None],
        queues: tuple[str, ...],
        fence: Fence,
    ) -> None:
        deadline = time.monotonic() + self.boot_timeout_s
        try:
            while time.monotonic() < deadline:
                # The store first: ``commit`` marks before it removes, so one of the two holds.
                in_pool = member in self.members(service)
                with self._lock:
                    committed = member in self._committed
                if not committed and not in_pool:
                    return  # trimmed or promoted meanwhile
                node = resolve()
                consumed = consumed_queues(self.app, [node], self.timeout_s) if node else {}
                if not node or node not in consumed:
                    time.sleep(self.poll_s)
                    continue
                stray = not committed and set(consumed[node]) & set(queues)
                if stray and not self._consumers(service, node, queues, False, fence):
                    continue  # no warm-start step, and its cancel failed: try again
                with self._lock:  # ready, unless a scale-up took it meanwhile (``commit``)
                    committed = member in self._committed
                    if not committed:
                        self._ready[member] = node
                if not committed:
                    log.info("warm replica %s (%s) ready", node, service)
                    return
                if not self._consumers(service, node, queues, True, fence):
                    continue
                detail = f"{node} booted and serves (taken by a scale-up while booting)"
                self._note(service, "warm-committed", detail)
                return
            self._note(service, "warm-boot-timeout",
                       f"{member} did not answer within {self.boot_timeout_s:g} s")  # fmt: skip
        except LeadershipLost as exc:
            self._note(service, "fenced", f"warm replica {member}: {exc}")
        except Exception as exc:  # the broker or the store: watched again at the next reconcile
            self._note(service, "warm-watch-failed", f"{member}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._watching.pop(member, None)
                self._committed.discard(member)

    def _consumers(
        self, service: str, node: str, queues: Sequence[str], add: bool, fence: Fence
    ) -> bool:
        """For a watch: add (a committed member) or cancel (a member without the warm-start
        step) ``node``'s consumers; on failure report it and pause before the next try."""
        problem = set_consumers(self.app, node, queues, add=add, fence=fence,
                                timeout_s=self.timeout_s)  # fmt: skip
        if problem:
            kind = "commit-failed" if add else "warm-cancel-failed"
            self._note(service, kind, f"{node}: {problem}")
            time.sleep(self.poll_s)
        return problem is None

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the watches in progress (for tests and benchmarks); True if none is left."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                threads = list(self._watching.values())
            if not threads:
                return True
            threads[0].join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return not self._watching

    # -- promote and check -------------------------------------------------------------------
    def promote(self, service: str, member: str, queues: Sequence[str], fence: Fence) -> str | None:
        """Make a ready member serve: add its consumers (confirmed), then drop it from the set.
        None when it serves now, else why not (it stays warm)."""
        node = self.node(member)
        if node is None:
            return f"{member} is not ready"
        problem = set_consumers(
            self.app, node, queues, add=True, fence=fence, timeout_s=self.timeout_s
        )
        if problem:
            self._note(service, "promote-failed", f"{node}: {problem}; it stays warm")
            return problem
        self.leave(service, member)
        return None

    def check(self, service: str, queues: Sequence[str], fence: Fence) -> list[str]:
        """Ready members whose consumer came back: cancelled again when idle, else released
        from the pool (then they serve). Returns the members released."""
        with self._lock:
            ready = dict(self._ready)
        members = {m: n for m, n in ready.items() if m in self.members(service)}
        if not members:
            return []
        consumed = consumed_queues(self.app, list(members.values()), self.timeout_s)
        released: list[str] = []
        for member, node in members.items():
            taken = set(consumed.get(node, ())) & set(queues)
            if not taken:
                continue
            busy = holds_tasks(self.app, node, self.timeout_s)
            if busy is None:
                continue  # no answer: judged again at the next reconcile
            if busy is False:
                problem = set_consumers(
                    self.app, node, queues, add=False, fence=fence, timeout_s=self.timeout_s
                )
                if problem is None and holds_tasks(self.app, node, self.timeout_s) is False:
                    detail = f"{node} consumed {sorted(taken)} while warm: cancelled"
                    self._note(service, "warm-consumer-corrected", detail)
                    continue
                # A task landed meanwhile: it serves, with its consumers back.
                set_consumers(
                    self.app, node, queues, add=True, fence=fence, timeout_s=self.timeout_s
                )
            fence.check(f"release {node} from {service}'s warm pool")
            self.leave(service, member)
            released.append(member)
            detail = f"{node} consumed {sorted(taken)} while warm and took a task: now serving"
            self._note(service, "warm-consumer-came-back", detail)
        return released

    def events(self) -> list[BackendEvent]:
        """What the pool did on its own since the last call."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def _note(self, service: str, kind: str, detail: str) -> None:
        log.info("%s %s: %s", service, kind, detail)
        with self._lock:
            self._events.append(BackendEvent(service, kind, detail))
