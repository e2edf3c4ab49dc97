"""Event-driven detection: a message landing on an idle service's queue starts its decision at once.

Polling alone makes a new backlog wait for the next cycle (half an interval on average, a whole
one at worst: 1 to 2 s at the stack's 2 s). The broker can tell us instead:

- **Redis**: keyspace notifications. The detector SUBSCRIBEs to ``__keyspace@<db>__:<key>`` for
  every list kombu keeps a managed queue in (the bare name and its priority sub-queues, behind the
  global key prefix: ``scaler.signals.redis_queues.priority_keys``), and a ``lpush``/``rpush``/
  ``linsert`` there is an arrival. Redis publishes these only when ``notify-keyspace-events``
  includes ``K`` and ``l`` (or ``A``); compose.yaml starts Redis with ``Kl``. Whether they arrive
  is checked by a probe (a push onto a key of the scaler's own, which must come back as an event
  within ``probe_timeout_s``), at every connection and every ``recheck_s``; ``CONFIG GET`` only
  words the reason when the probe fails (it may be denied to the scaler's Redis user, and then
  the reason says so).
- **RabbitMQ** (and any other broker): Celery's ``task-sent`` events, which a producer sends when
  ``task_send_sent_event`` is on (the app sets it). Only publishes through Celery are seen.

An arrival wakes the loop only for a service that is *armed* and only when it leaves a backlog
over the service's ring level: the loop arms, after every cycle, by ``scaler.arming``'s rule (at
0: an idle service at its minimum, below its target, or whose count it could not read; at a
level: a service at its minimum whose decision saw a backlog within its target and held, which
rings again once the backlog reaches what the target would scale on). Right before a ring the
detector checks the backlog (Redis: ``LLEN`` of the service's lists; a message a free consumer
took at once is no backlog), so a trickle that idle replicas absorb costs a length check per
window, not a decision.
Wake-ups at level 0 are debounced per service (``Debouncer``): the first arrival rings at once,
the ones within ``debounce_s`` after it are coalesced into one more ring at the window's end (if
the service is still armed then), so a flood of N messages costs about one decision per window,
not N. A ring at a level needs no window: the level is crossed once per cycle (the service rings
once, then waits for the loop's next arming). While a cycle decides nothing rings; what
arrives meanwhile is judged against the arming it ends with. The periodic cycle stays: it is
the safety net.
A lost connection, notifications switched off, or a probe that never comes back turns detection
to *polling*: the status and the ``scaler_event_detection_up`` metric say so and why, the
detector reconnects with backoff, and on its return rings every armed service once (a backlog
may have landed while it was blind).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from scaler.signals.redis_queues import DEFAULT_SEP, DEFAULT_STEPS, priority_keys

log = logging.getLogger("scaler.wakeup")

# The list operations that put a message onto a queue (LMOVE/RPOPLPUSH notify the destination
# as lpush/rpush). Pops are consumption, not arrival.
PUSH_EVENTS = frozenset({b"lpush", b"rpush", b"linsert"})
EVENTS = "events"
POLLING = "polling"


class Alarm:
    """The loop's alarm clock: ``wait`` returns at the timeout, at a stop, or when rung."""

    def __init__(self, slice_s: float = 0.25) -> None:
        self._cond = threading.Condition()
        self._rung: set[str] = set()
        # ``stop`` is a plain Event that cannot notify this condition: it is re-checked every
        # ``slice_s``, so a stop is seen within that, as it was within the old stop.wait().
        self.slice_s = slice_s

    def ring(self, services: Iterable[str]) -> None:
        """Ask for a cycle now on behalf of ``services`` (thread-safe)."""
        with self._cond:
            self._rung.update(services)
            self._cond.notify_all()

    def wait(self, timeout_s: float, stop: threading.Event) -> set[str]:
        """Block until ``timeout_s`` passed, ``stop`` is set or a ring came; the services rung
        (empty on a timeout or a stop). Rings since the last wait count: none is lost."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._rung and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, self.slice_s))
            rung, self._rung = self._rung, set()
        return rung


class Debouncer:
    """At most one ring per service per window: the first arrival at once, later ones in the
    window folded into one ring at its end (if the service is still armed then). A service armed
    at a level (``level`` > 0) rings at the first arrival that finds the backlog over it, then
    not again until ``rearm`` (the loop's next arming).

    While the loop decides (``pause`` until ``rearm``) nothing rings: a ring then would be judged
    against the arming the cycle is replacing (a scale-up under way would be decided again at
    once, for nothing). Arrivals meanwhile are held, and ``rearm`` judges them against the new
    arming: at a level at once (the backlog that grew while a held decision was made rings as
    soon as it is made, not at the next arrival or the window's end), at 0 with their window.

    ``armed`` is asked at the window's end; ``backlog`` (when given) right before each ring, which
    is skipped when the arrival left nothing waiting (a free consumer took it at once: no new
    backlog, nothing to decide); a window whose check found nothing lasts only ``recheck_s``, so
    a backlog that forms a few messages later is seen that soon. ``ring`` and ``backlog`` are
    called outside the lock. Its own thread fires the trailing rings; ``stop`` ends it. A caller
    that drives ``clock`` itself (the simulator) calls ``fire_due`` instead of starting it.
    """

    def __init__(
        self,
        ring: Callable[[set[str]], None],
        armed: Callable[[str], bool],
        window_s: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
        backlog: Callable[[str], bool] | None = None,
        recheck_s: float = 0.01,
        level: Callable[[str], int] = lambda service: 0,
    ) -> None:
        self._ring, self._armed, self._window_s, self._clock = ring, armed, window_s, clock
        self._backlog, self._level = backlog, level
        self._latched: set[str] = set()  # rung at their level since the last arming
        self._paused = False  # the loop is deciding: arrivals are held until it arms again
        self._held: set[str] = set()
        self.recheck_s = recheck_s
        self.taken_at_once = 0  # checks that found nothing waiting: no ring
        self._cond = threading.Condition()
        self._fired_at: dict[str, float] = {}
        self._pending: set[str] = set()
        self._stopped = False
        self.rings: dict[str, int] = {}
        self.coalesced = 0
        self._thread = threading.Thread(target=self._trailing, name="wakeup-debounce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(5)

    def pause(self) -> None:
        """The loop is deciding: hold arrivals and due rings until ``rearm``."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """``rearm`` if still paused (a cycle that failed before arming)."""
        with self._cond:
            paused = self._paused
        if paused:
            self.rearm()

    def rearm(self) -> None:
        """The loop armed again (after a cycle): services rung at a level may ring again, and
        what arrived while it decided is judged against the new arming."""
        with self._cond:
            self._latched.clear()
            self._paused = False
            held, self._held = self._held, set()
            armed = {s for s in held if self._armed(s)}
            now = {s for s in armed if self._level(s) > 0}
        for service in sorted(now):
            self._level_arrival(service)
        for service in sorted(armed - now):  # as if they arrived now: their window decides
            self._window_arrival(service)

    def arrival(self, service: str) -> None:
        """One arrival for an armed ``service``: ring now, or fold it into the window's ring."""
        with self._cond:
            if self._paused:
                self.coalesced += 1
                self._held.add(service)
                return
        if self._level(service) > 0:
            self._level_arrival(service)
            return
        self._window_arrival(service)

    def _window_arrival(self, service: str) -> None:
        """Ring now if the service's window is over (or it never rang), else fold the arrival
        into the ring at the window's end."""
        with self._cond:
            now = self._clock()
            last = self._fired_at.get(service)
            if last is not None and now - last < self._window_s():
                self.coalesced += 1
                if service not in self._pending:
                    self._pending.add(service)
                    self._cond.notify_all()
                return
            self._fired_at[service] = now
        self._fire({service})

    def _level_arrival(self, service: str) -> None:
        """Ring once the backlog is over the service's level; once per arming."""
        with self._cond:
            if service in self._latched:
                self.coalesced += 1
                return
        if self._backlog is not None and not self._backlog(service):
            return
        with self._cond:
            if service in self._latched:
                return
            self._latched.add(service)
            self.rings[service] = self.rings.get(service, 0) + 1
        self._ring({service})

    def _fire(self, services: set[str]) -> None:
        """Ring those of ``services`` with a backlog (all of them without a ``backlog`` check)."""
        if self._backlog is not None:
            waiting = {s for s in services if self._backlog(s)}
            with self._cond:
                self.taken_at_once += len(services) - len(waiting)
                # Nothing waited, so nothing rang: the window shrinks to ``recheck_s``, and an
                # arrival within it (a burst's next message, which may find the free consumers
                # gone) is checked that soon, not at the end of a whole debounce window.
                end = self._clock() - self._window_s() + self.recheck_s
                for service in services - waiting:
                    self._fired_at[service] = end
                    self._cond.notify_all()
            services = waiting
        if not services:
            return
        with self._cond:
            for service in services:
                self.rings[service] = self.rings.get(service, 0) + 1
        self._ring(services)

    def ring_now(self, services: Iterable[str]) -> None:
        """Ring ``services`` regardless of their windows (after a reconnection: catch up)."""
        chosen = set(services)
        if not chosen:
            return
        with self._cond:
            now = self._clock()
            for service in chosen:
                self._fired_at[service] = now
                self._pending.discard(service)
                self.rings[service] = self.rings.get(service, 0) + 1
        self._ring(chosen)

    def _trailing(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._pending:
                    self._cond.wait()
                    continue
                fire, next_at = self._take_due()
                if next_at is not None:
                    self._cond.wait(max(0.001, next_at - self._clock()))
                    continue
                if fire:
                    self._cond.release()
                    try:
                        self._fire(fire)
                    finally:
                        self._cond.acquire()

    def _take_due(self) -> tuple[set[str], float | None]:
        """Under the lock, with rings pending: the services whose trailing ring is due now
        (armed ones, marked as rung; held ones while paused), or none and when the first is."""
        window = self._window_s()
        now = self._clock()
        # A service that never rang is due at once (its first arrival rings at once).
        due = {s for s in self._pending if now - self._fired_at.get(s, -math.inf) >= window}
        if not due:
            return set(), min(self._fired_at[s] for s in self._pending) + window
        self._pending -= due
        if self._paused:  # judged against the next arming
            self._held |= due
            return set(), None
        fire = {s for s in due if self._armed(s)}
        for service in fire:
            self._fired_at[service] = now
        return fire, None

    def fire_due(self) -> float | None:
        """Fire the trailing rings due at the clock's reading, as the thread would, and return
        when the next is due (None: none pending). For a caller that drives the clock itself
        instead of starting the thread: the simulator runs this very debouncer in its time."""
        if not self._pending:
            return None
        with self._cond:
            while self._pending:
                fire, next_at = self._take_due()
                if next_at is not None:
                    return next_at
                if fire:
                    self._cond.release()
                    try:
                        self._fire(fire)
                    finally:
                        self._cond.acquire()
            return None


@dataclass(frozen=True)
class Watch:
    """What the loop wants watched: which queue belongs to which service, and which services an
    arrival should wake now (armed)."""

    queues: Mapping[str, str]  # queue -> service
    armed: frozenset[str]
    enabled: bool = True
    debounce_s: float = 0.2
    # service -> ring only when more than this many messages wait (absent: any backlog)
    levels: Mapping[str, int] = field(default_factory=dict)


class WakeupDetector:
    """A background listener for one broker's arrivals; subclasses implement ``_listen``.

    ``_listen`` runs until it fails or ``_stop`` is set; it calls ``_arrival(queue)`` per
    arrival and ``_set_up()`` / ``_set_down(reason)`` as the stream comes and goes. The base
    class reconnects with backoff (``backoff_s``: first, cap), keeps the status, and debounces.
    """

    source = "?"

    def __init__(
        self,
        ring: Callable[[set[str]], None],
        backoff_s: tuple[float, float] = (0.5, 10.0),
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.backoff_s, self.wall = backoff_s, wall
        self._watch = Watch({}, frozenset())  # nothing to watch until the loop's first cycle
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._debouncer = Debouncer(
            ring,
            self._is_armed,
            lambda: self._watch.debounce_s,
            backlog=self._has_backlog,
            level=lambda service: self._watch.levels.get(service, 0),
        )
        self._since_watch: dict[str, int] = {}  # arrivals per service since the last arming
        self._thread = threading.Thread(target=self._run, name="wakeup-listen", daemon=True)
        self.mode = POLLING
        self.reason: str | None = "connecting: no event seen yet"
        self.since = wall()
        self.arrivals = 0
        self.ignored = 0  # arrivals for a service that was not armed (busy above its minimum)
        self.connects = 0
        self._was_up = False

    # -- what the loop and the CLI call ------------------------------------------------------

    def start(self) -> None:
        self._debouncer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._debouncer.stop()

    def deciding(self) -> None:
        """A cycle starts: arrivals wait for its arming (``Debouncer.pause``)."""
        self._debouncer.pause()

    def resume(self) -> None:
        """A cycle ended without arming (it failed): judge what it held against the last one."""
        self._debouncer.resume()

    def watch(self, watch: Watch) -> None:
        """The loop's view after a cycle: queues to services, the armed services, the policy."""
        with self._lock:
            old, self._watch = self._watch, watch
            self._since_watch = {}
        self._debouncer.rearm()
        if (old.queues, old.enabled) != (watch.queues, watch.enabled):
            self._changed.set()

    @property
    def up(self) -> bool:
        return self.mode == EVENTS

    def status(self) -> dict[str, Any]:
        """JSON-ready: mode ("events" or "polling"), its reason, counts."""
        with self._lock:
            return {
                "mode": self.mode,
                "source": self.source,
                "reason": self.reason,
                "since": self.since,
                "debounce_s": self._watch.debounce_s,
                "armed": sorted(self._watch.armed),
                "levels": dict(sorted(self._watch.levels.items())),
                "arrivals": self.arrivals,
                "ignored": self.ignored,
                "wakeups": dict(self._debouncer.rings),
                "coalesced": self._debouncer.coalesced,
                "taken_at_once": self._debouncer.taken_at_once,
                "connects": self.connects,
            }

    # -- for subclasses ------------------------------------------------------------------------

    def _listen(self, watch: Watch) -> None:
        raise NotImplementedError

    def _has_backlog(self, service: str) -> bool:
        """Whether the backlog on ``service``'s queues is over its ring level now. A detector
        that cannot read queue lengths answers True at level 0 (the decision reads them) and, at
        a level, once more messages than the level arrived since the arming: late rather than
        spurious, as it cannot tell what the consumers took meanwhile."""
        level = self._watch.levels.get(service, 0)
        return level == 0 or self._since_watch.get(service, 0) > level

    def _is_armed(self, service: str) -> bool:
        watch = self._watch
        return watch.enabled and service in watch.armed

    def _arrival(self, queue: str) -> None:
        watch = self._watch
        service = watch.queues.get(queue)
        if service is None:
            return
        with self._lock:
            self.arrivals += 1
            self._since_watch[service] = self._since_watch.get(service, 0) + 1
            armed = watch.enabled and service in watch.armed
            if not armed:
                self.ignored += 1
        if armed:
            self._debouncer.arrival(service)

    def _set_up(self) -> None:
        if self.mode == EVENTS:
            return
        self._set(EVENTS, None)
        if self._was_up:  # back after an outage: a backlog may have landed unseen
            self._debouncer.ring_now(self._watch.armed if self._watch.enabled else ())
        self._was_up = True

    def _set_down(self, reason: str) -> None:
        self._set(POLLING, reason)

    def _set(self, mode: str, reason: str | None) -> None:
        with self._lock:
            if (mode, reason) == (self.mode, self.reason):
                return
            if mode != self.mode:
                self.since = self.wall()
            self.mode, self.reason = mode, reason
        level = logging.INFO if mode == EVENTS else logging.WARNING
        log.log(level, json.dumps({"event": f"detection-{mode}", "source": self.source,
                                   "reason": reason}))  # fmt: skip

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        first, cap = self.backoff_s
        delay = first
        while not self._stop.is_set():
            self._changed.clear()  # before reading the watch: a change after this is not lost
            watch = self._watch
            if not watch.enabled:
                self._set_down("wakeup.events is off in the policy")
                self._changed.wait()
                continue
            if not watch.queues:  # before the first cycle: nothing to watch yet
                self._changed.wait(1.0)
                continue
            try:
                self._listen(watch)
                delay = first  # returned: the watch changed; listen again at once
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self.mode == EVENTS:
                    delay = first
                self._set_down(
                    f"event stream lost ({type(exc).__name__}: {exc}); reconnecting, "
                    f"next attempt in {delay:g} s"
                )
                self._stop.wait(delay)
                delay = min(delay * 2, cap)


class RedisKeyspaceDetector(WakeupDetector):
    """Arrivals from Redis keyspace notifications on the managed queues' lists."""

    source = "redis keyspace notifications"

    def __init__(
        self,
        url: str,
        ring: Callable[[set[str]], None],
        *,
        key_prefix: str = "",
        sep: str = DEFAULT_SEP,
        steps: Sequence[int] = DEFAULT_STEPS,
        probe_key: str | None = None,
        probe_timeout_s: float = 1.0,
        recheck_s: float = 15.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(ring, **kwargs)
        self.url, self.key_prefix, self.sep, self.steps = url, key_prefix, sep, tuple(steps)
        self.probe_key = probe_key or f"scaler:wakeup-probe:{uuid.uuid4().hex[:12]}"
        self.probe_timeout_s, self.recheck_s = probe_timeout_s, recheck_s
        self._lengths: redis.Redis | None = None  # for _has_backlog, beside the subscriber

    def _has_backlog(self, service: str) -> bool:
        """LLEN of the service's lists (one pipeline) over its ring level: an arrival a waiting
        consumer took at once (BRPOP) left them empty, and then there is no new backlog to
        decide on; a held service rings only once its backlog reached its level."""
        keys = [
            key
            for queue, owner in self._watch.queues.items()
            if owner == service
            for key in priority_keys(queue, self.sep, self.steps, self.key_prefix)
        ]
        try:
            if self._lengths is None:
                self._lengths = redis.Redis.from_url(
                    self.url, socket_connect_timeout=1.0, socket_timeout=1.0
                )
            with self._lengths.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                waiting = sum(int(n) for n in pipe.execute())
            return waiting > self._watch.levels.get(service, 0)
        except redis.RedisError:
            return True  # unknown: let the decision read the queues itself

    def _channels(self, db: int, queues: Iterable[str]) -> dict[bytes, str]:
        """Keyspace channel -> queue, for every list of every queue."""
        out: dict[bytes, str] = {}
        for queue in queues:
            for key in priority_keys(queue, self.sep, self.steps, self.key_prefix):
                out[f"__keyspace@{db}__:{key}".encode()] = queue
        return out

    def _listen(self, watch: Watch) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=2.0)
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        channels = self._channels(db, watch.queues)
        probe_channel = f"__keyspace@{db}__:{self.probe_key}".encode()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(probe_channel, *channels)
            with self._lock:
                self.connects += 1
            probe_sent: float | None = None
            next_probe = time.monotonic()
            while not self._stop.is_set() and not self._changed.is_set():
                now = time.monotonic()
                if probe_sent is None and now >= next_probe:
                    with client.pipeline(transaction=False) as pipe:
                        pipe.lpush(self.probe_key, "probe")
                        pipe.delete(self.probe_key)
                        pipe.execute()
                    probe_sent, next_probe = now, now + self.recheck_s
                if probe_sent is not None and now - probe_sent > self.probe_timeout_s:
                    probe_sent = None
                    self._set_down(self._why_silent(client))
                message = pubsub.get_message(timeout=0.25)
                if not message or message.get("type") != "message":
                    continue
                if message["data"] not in PUSH_EVENTS:
                    continue
                if message["channel"] == probe_channel:
                    probe_sent = None
                    self._set_up()
                    continue
                queue = channels.get(message["channel"])
                if queue is not None:
                    self._arrival(queue)
        finally:
            try:
                pubsub.close()
            finally:
                client.close()

    def _why_silent(self, client: redis.Redis) -> str:
        """Why the probe's push came back as no event, in words an operator can act on."""
        head = (
            f"no keyspace notification for a test push within {self.probe_timeout_s:g} s; "
            "polling only"
        )
        try:
            reply: dict[Any, Any] = client.config_get("notify-keyspace-events")  # type: ignore[assignment]
        except redis.ResponseError as exc:  # NOPERM: the scaler's ACL user may not run CONFIG
            return f"{head} (CONFIG GET denied to this Redis user, setting unknown: {exc})"
        flags = str(reply.get("notify-keyspace-events", reply.get(b"notify-keyspace-events", "")))
        if "K" in flags and ("l" in flags or "A" in flags):
            return f"{head} (notify-keyspace-events is {flags!r}, which should deliver them)"
        return (
            f"{head}: the broker's notify-keyspace-events is {flags!r}, needs K and l "
            "(e.g. `CONFIG SET notify-keyspace-events Kl`, or redis-server "
            "--notify-keyspace-events Kl as compose.yaml does)"
        )


class CelerySentDetector(WakeupDetector):
    """Arrivals from Celery's ``task-sent`` events (any broker; the stack uses them on RabbitMQ).

    Only tasks published through Celery with ``task_send_sent_event`` on are seen; the periodic
    cycle still counts everything else.
    """

    source = "celery task-sent events"

    def __init__(self, app: Any, ring: Callable[[set[str]], None], **kwargs: Any) -> None:
        super().__init__(ring, **kwargs)
        self.app = app

    def _listen(self, watch: Watch) -> None:
        if not self.app.conf.task_send_sent_event:
            self._set_down(
                "task_send_sent_event is off in the app's configuration: its producers send no "
                "task-sent events"
            )
            self._changed.wait()
            return
        detector = self
        base = self.app.events.Receiver
        iterations = 0

        class Receiver(base):  # type: ignore[misc, valid-type]
            connect_max_retries = 0  # fail fast: the detector's loop backs off

            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                nonlocal iterations
                iterations = 0
                with detector._lock:
                    detector.connects += 1

            def on_iteration(self) -> None:
                # Subscribed once the first drain after consume-ready returned (as the recorder).
                nonlocal iterations
                iterations += 1
                if iterations == 2:
                    detector._set_up()
                if detector._stop.is_set() or detector._changed.is_set():
                    self.should_stop = True

        def on_sent(event: Mapping[str, Any]) -> None:
            queue = event.get("queue") or event.get("routing_key")
            if isinstance(queue, str):
                self._arrival(queue)

        with self.app.connection_for_read() as conn:
            receiver = Receiver(conn, handlers={"task-sent": on_sent}, routing_key="task.sent")
            for _ in receiver.itercapture(limit=None, timeout=None, wakeup=False):
                pass


def detector_for_app(
    app: Any, ring: Callable[[set[str]], None], probe_key: str | None = None
) -> WakeupDetector:
    """The detector matching the app's broker: keyspace notifications on Redis (with its key
    prefix and priority layout), Celery's task-sent events otherwise."""
    url = str(app.conf.broker_url or "")
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        options = app.conf.broker_transport_options or {}
        return RedisKeyspaceDetector(
            url,
            ring,
            key_prefix=str(options.get("global_keyprefix", "")),
            sep=str(options.get("sep", DEFAULT_SEP)),
            steps=tuple(options.get("priority_steps", DEFAULT_STEPS)),
            probe_key=probe_key,
        )
    return CelerySentDetector(app, ring)
