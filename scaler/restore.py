"""Put a dead worker's unacked messages back on their queues at once (Redis; issue 12).

On Redis, kombu keeps a message a worker has taken in the ``unacked`` hash until it is acked, and
only its visibility-timeout sweep (an hour in this stack) gives back what a worker killed outright
held. The workers of ``services.ownership`` also record each message's holder (its Celery node
name) in ``<prefix>unacked_owner``, in the same pipelines as kombu's own writes. This module is
the other half, and the only place a dead worker's messages are restored:

- :meth:`UnackedRestorer.restore_nodes` puts back every message owned by the given nodes, the
  way kombu's ``restore_by_tag`` does: the payload rewritten by kombu's own
  ``Channel._do_restore_message`` (``redelivered`` set in the headers and the delivery info, the
  target list found through the exchange's binding table, the priority sub-queue from the
  message's priority), pushed at the consuming end of the list (``RPUSH``, as kombu's sweep does:
  it is taken next). kombu computes the bytes; one Lua script then moves each message
  **atomically**: only if the owner entry still names that node and the ``unacked`` entry is
  still exactly the one read, it pushes, then ``HDEL unacked``, ``ZREM unacked_index`` and
  ``HDEL unacked_owner``. So a message is restored once, whoever races: a second restorer (two
  scalers, a worker restarting under the same name) finds it gone; kombu's ``restore_by_tag``
  WATCHes ``unacked``, so its MULTI either ran first (our script then finds the owner entry gone)
  or is aborted and retried (and then finds nothing to restore). An owner entry whose message is
  gone (acked, or restored by a process without owner tracking) is deleted.
- Callers pass only nodes known dead, as the engine says: the backends name a worker whose
  container or process died (``ComposeBackend``/``LocalBackend.reconcile``, and after a drain
  stopped one), by the dead container's **hostname** as well (``hosts``: every owner named
  ``<anything>@<that hostname>``, the name the worker itself reported, so a worker whose name
  was never confirmed is not missed). The loop's :meth:`UnackedRestorer.sweep` (at a scaler's
  start or takeover) takes an owner for dead only when its container exited, or when the engine
  knows no container of its name or hostname **and** it does not answer a Celery ping. A worker
  whose container runs is never touched, answering or not: a ``solo`` worker, or a busy main
  process, cannot answer while it works.

Enabled for an app whose Redis transport options name ``unacked_owner_key`` (the service app
does); :meth:`UnackedRestorer.for_app` returns None otherwise (RabbitMQ requeues a dead
consumer's messages itself).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from scaler.backends.base import BackendEvent
from scaler.worker_contract import OWNER_KEY

log = logging.getLogger(__name__)

RESTORED = "restored"  # BackendEvent.kind of a restore (its count is BackendEvent.count)
RESTORE_FAILED = "restore-failed"

# KEYS: 1 unacked, 2 unacked_index, 3 unacked_owner, 4.. target lists.
# ARGV: 1 node, then per message: tag, the unacked entry as read, payload, first key, key count.
# Returns {gone (owner entries of messages no longer unacked: deleted), changed, restored tags...}.
_MOVE = """
local node = ARGV[1]
local gone, changed = 0, 0
local out = {0, 0}
local i = 2
while i <= #ARGV do
  local tag, expected, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local first, count = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  i = i + 5
  if redis.call('HGET', KEYS[3], tag) == node then
    local entry = redis.call('HGET', KEYS[1], tag)
    if not entry then
      redis.call('HDEL', KEYS[3], tag)
      gone = gone + 1
    elseif entry == expected and count > 0 then
      for k = first, first + count - 1 do
        redis.call('RPUSH', KEYS[k], payload)
      end
      redis.call('HDEL', KEYS[1], tag)
      redis.call('ZREM', KEYS[2], tag)
      redis.call('HDEL', KEYS[3], tag)
      out[#out + 1] = tag
    else
      changed = changed + 1
    end
  end
end
out[1], out[2] = gone, changed
return out
"""

# KEYS: 1 unacked, 2 unacked_index, 3 unacked_owner. ARGV: 1 node, then delivery tags.
# Removes the entries of the tags ``node`` still owns, as an ack would; returns how many.
_SETTLE = """
local node, n = ARGV[1], 0
for i = 2, #ARGV do
  local tag = ARGV[i]
  if redis.call('HGET', KEYS[3], tag) == node then
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
    redis.call('HDEL', KEYS[3], tag)
    n = n + 1
  end
end
return n
"""

# KEYS: 1 unacked, 2.. target lists. ARGV per message: tag, payload, first key, key count.
# Pushes each message whose tag has no ``unacked`` entry; returns how many.
_RETURN = """
local n, i = 0, 1
while i <= #ARGV do
  local tag, payload = ARGV[i], ARGV[i + 1]
  local first, count = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  if redis.call('HEXISTS', KEYS[1], tag) == 0 and count > 0 then
    for k = first, first + count - 1 do
      redis.call('RPUSH', KEYS[k], payload)
    end
    n = n + 1
  end
end
return n
"""

BATCH = 200  # messages per script call (a script blocks Redis while it runs)


@dataclass(frozen=True)
class RestoreResult:
    """What one restore did."""

    restored: int = 0
    by_node: Mapping[str, int] = field(default_factory=dict)  # node -> messages restored
    by_queue: Mapping[str, int] = field(default_factory=dict)  # routing key -> restored
    stale: int = 0  # owner entries whose message was no longer unacked (deleted)
    skipped: int = 0  # left for the visibility timeout: unreadable, unroutable or changed


class _Recorder:
    """Stands in for a pipeline in kombu's ``_do_restore_message``: records the pushes."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str]] = []

    def rpush(self, key: str, value: str) -> None:
        self.pushes.append((key, value))

    lpush = rpush  # never used with leftmost=False; recorded the same way


class UnackedRestorer:
    """Restores the unacked messages of dead Celery nodes on one Redis broker (see module doc).

    ``client``: a plain redis client of the broker (keys are prefixed here); ``channel``: a kombu
    Redis channel of the same app (its ``_do_restore_message`` computes what is pushed where);
    ``ping``: node names -> the ones that answered (for :meth:`answering` and :meth:`sweep`).
    """

    def __init__(
        self,
        client: redis.Redis,
        channel_factory: Callable[[], Any],
        *,
        key_prefix: str = "",
        owner_key: str = OWNER_KEY,
        unacked_key: str = "unacked",
        index_key: str = "unacked_index",
        ping: Callable[[list[str]], set[str]] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self._channel_factory = channel_factory
        self._channel: Any = None
        self.prefix = key_prefix
        self.keys = (key_prefix + unacked_key, key_prefix + index_key, key_prefix + owner_key)
        self._ping = ping
        self._close = close
        self._move = client.register_script(_MOVE)
        self._settle = client.register_script(_SETTLE)
        self._return = client.register_script(_RETURN)

    @classmethod
    def for_app(cls, app: Any, *, ping_timeout_s: float = 1.0) -> UnackedRestorer | None:
        """A restorer on ``app``'s Redis broker, or None when the app does not record owners
        (not Redis, or no ``unacked_owner_key`` transport option)."""
        url = str(app.conf.broker_url or "")
        options = app.conf.broker_transport_options or {}
        if url.split("://", 1)[0] not in ("redis", "rediss") or not options.get(
            "unacked_owner_key"
        ):
            return None
        client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        connection: Any = None

        def channel() -> Any:
            nonlocal connection
            if connection is not None:
                connection.release()
            connection = app.connection_for_write()
            return connection.default_channel

        def ping(nodes: list[str]) -> set[str]:
            replies = app.control.ping(destination=nodes, timeout=ping_timeout_s) or []
            return {name for reply in replies for name in reply}

        def close() -> None:
            if connection is not None:
                connection.release()
            client.close()

        return cls(
            client,
            channel,
            key_prefix=str(options.get("global_keyprefix", "")),
            owner_key=str(options["unacked_owner_key"]),
            unacked_key=str(options.get("unacked_key", "unacked")),
            index_key=str(options.get("unacked_index_key", "unacked_index")),
            ping=ping,
            close=close,
        )

    # -- reading -------------------------------------------------------------------------------

    def owners(self) -> dict[str, int]:
        """Node -> how many unacked messages it holds (by the owner hash)."""
        return dict(Counter(_text(v) for v in _hgetall(self.client, self.keys[2]).values()))

    def owned_by(self, node: str) -> list[str]:
        """The delivery tags ``node`` holds."""
        return [
            _text(t) for t, n in _hgetall(self.client, self.keys[2]).items() if _text(n) == node
        ]

    def answering(self, nodes: Sequence[str]) -> set[str]:
        """Those of ``nodes`` that answer a Celery ping (all of them when there is no ping: a
        restorer that cannot ask takes nobody for dead)."""
        if not nodes:
            return set()
        if self._ping is None:
            return set(nodes)
        return self._ping(list(nodes)) & set(nodes)

    # -- restoring -----------------------------------------------------------------------------

    def restore_nodes(
        self, nodes: Iterable[str], *, hosts: Iterable[str] = (), keep: Iterable[str] = ()
    ) -> RestoreResult:
        """Put back every message the (dead) ``nodes`` hold, and every message of a node named
        ``<anything>@<host>`` for a (dead) container's hostname in ``hosts`` (a container's
        worker named as its start script chose, never confirmed), except the delivery tags in
        ``keep`` (what a live worker still holds: its own sweep after a reconnect); raises
        redis.RedisError."""
        wanted, dead_hosts = set(nodes), {h for h in hosts if h}
        if not wanted and not dead_hosts:
            return RestoreResult()
        held = set(keep)
        owned = {
            _text(tag): _text(node)
            for tag, node in _hgetall(self.client, self.keys[2]).items()
            if (_text(node) in wanted or on_host(_text(node), dead_hosts))
            and _text(tag) not in held
        }
        wanted |= set(owned.values())
        by_node: Counter[str] = Counter()
        by_queue: Counter[str] = Counter()
        stale = skipped = 0
        tags = sorted(owned)
        for start in range(0, len(tags), BATCH):
            batch = tags[start : start + BATCH]
            entries = _hmget(self.client, self.keys[0], batch)
            for node in sorted({owned[t] for t in batch}):
                mine = [(t, e) for t, e in zip(batch, entries, strict=True) if owned[t] == node]
                done, gone, left, queues = self._move_batch(node, mine)
                by_node[node] += done
                by_queue.update(queues)
                stale += gone
                skipped += left
        result = RestoreResult(
            restored=sum(by_node.values()),
            by_node={n: c for n, c in by_node.items() if c},
            by_queue=dict(by_queue),
            stale=stale,
            skipped=skipped,
        )
        if result.restored or result.skipped:
            log.warning(
                json.dumps(
                    {"event": "unacked-restored", "nodes": sorted(wanted),
                     "restored": result.restored, "by_queue": result.by_queue,
                     "stale": stale, "skipped": skipped}
                )
            )  # fmt: skip
        return result

    def settle(self, node: str, tags: Iterable[str]) -> int:
        """Remove the entries of ``tags`` that ``node`` still owns, as their acks would have (the
        live worker acked them and Redis never got it); how many; raises redis.RedisError."""
        wanted = sorted(set(tags))
        done = 0
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            done += int(self._settle(keys=list(self.keys), args=[node, *batch]))
        return done

    def give_back_untracked(self, entries: Mapping[str, str | bytes]) -> int:
        """Push back the messages a live worker took off their queues but could not record as
        unacked (``services.ownership``: the connection went between kombu's BRPOP reply and
        its ``unacked`` write, and kombu dropped them), given as tag -> the unacked entry that
        was not written. A tag whose entry did reach Redis is left to :meth:`restore_nodes`
        (call this first). How many went back; raises redis.RedisError."""
        keys = [self.keys[0]]
        argv: list[str | bytes] = []
        for tag, raw in sorted(entries.items()):
            target = self._targets(raw)
            if target is None:
                log.warning("an untracked message of tag %s has no route: dropped", tag)
                continue
            payload, lists, _ = target
            argv += [tag, payload, str(len(keys) + 1), str(len(lists))]
            keys += lists
        if not argv:
            return 0
        return int(self._return(keys=keys, args=argv))

    def sweep(
        self,
        workers: Callable[[], tuple[Iterable[str], Iterable[str], Iterable[str]]],
        *,
        queues: Iterable[str] | None = None,
    ) -> RestoreResult:
        """Restore what dead owners hold: for a scaler's start or takeover, when a worker may
        have died while no scaler watched.

        ``workers()`` is the engine's word, asked after the owners are read (so every owner that
        held a message then has its container in the answer): the node names and the container
        hostnames of the live workers, and the hostnames of containers that exited. An owner
        whose name or hostname (``<name>@<host>``) is live is never touched, whether or not it
        answers a ping (a ``solo`` worker, or a busy main process, cannot). An owner on an exited
        container is dead. An owner the engine does not know at all (its container is gone) is
        dead only if it does not answer a ping either (a worker outside the backend's view).
        With ``queues``, a node holding any message of another queue is left alone (it is
        nobody this scaler manages)."""
        owners = set(self.owners())
        if not owners:
            return RestoreResult()
        names, live_hosts, exited_hosts = (set(x) for x in workers())
        candidates = sorted(n for n in owners - names if not on_host(n, live_hosts))
        if queues is not None and candidates:
            managed = set(queues)
            foreign = self._nodes_holding_other_queues(candidates, managed)
            candidates = [n for n in candidates if n not in foreign]
        exited = [n for n in candidates if on_host(n, exited_hosts)]
        unknown = [n for n in candidates if n not in exited]
        dead = exited + [n for n in unknown if n not in self.answering(unknown)]
        return self.restore_nodes(dead) if dead else RestoreResult()

    def close(self) -> None:
        if self._close is not None:
            self._close()
        else:
            self.client.close()

    # -- internals -------------------------------------------------------------------------------

    def _nodes_holding_other_queues(self, nodes: list[str], managed: set[str]) -> set[str]:
        owned = {
            _text(t): _text(n) for t, n in _hgetall(self.client, self.keys[2]).items()
        }  # fmt: skip
        tags = [t for t, n in owned.items() if n in nodes]
        foreign: set[str] = set()
        for start in range(0, len(tags), BATCH):
            batch = tags[start : start + BATCH]
            for tag, raw in zip(batch, _hmget(self.client, self.keys[0], batch), strict=True):
                routing_key = _routing_key(raw)
                if routing_key is not None and routing_key not in managed:
                    foreign.add(owned[tag])
        return foreign

    def _targets(self, raw: bytes | str) -> tuple[str, list[str], str] | None:
        """(payload, prefixed target lists, routing key) as kombu would restore ``raw``."""
        try:
            message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            return None
        recorder = _Recorder()
        for attempt in (1, 2):
            try:
                if self._channel is None:
                    self._channel = self._channel_factory()
                self._channel._do_restore_message(
                    message, exchange, routing_key, recorder, leftmost=False
                )
                break
            except Exception:
                self._channel = None  # a broken connection: one fresh channel, then give up
                if attempt == 2:
                    raise
        if not recorder.pushes:
            return None
        payloads = {value for _, value in recorder.pushes}
        if len(payloads) != 1:
            return None
        return payloads.pop(), [self.prefix + key for key, _ in recorder.pushes], str(routing_key)

    def _move_batch(
        self, node: str, entries: list[tuple[str, bytes | None]]
    ) -> tuple[int, int, int, Counter[str]]:
        keys = list(self.keys)
        argv: list[str | bytes] = [node]
        queue_of: dict[str, str] = {}
        unroutable = 0
        for tag, raw in entries:
            if raw is None:
                argv += [tag, "", "", "0", "0"]  # gone: the script deletes the owner entry
                continue
            target = self._targets(raw)
            if target is None:
                unroutable += 1  # left for the visibility timeout, as kombu would leave it
                continue
            payload, lists, routing_key = target
            argv += [tag, raw, payload, str(len(keys) + 1), str(len(lists))]
            keys += lists
            queue_of[tag] = routing_key
        if len(argv) == 1:
            return 0, 0, unroutable, Counter()
        reply = self._move(keys=keys, args=argv)
        gone, changed = int(reply[0]), int(reply[1])
        moved = [_text(tag) for tag in reply[2:]]
        return len(moved), gone, changed + unroutable, Counter(queue_of[t] for t in moved)


def restore_dead_workers(
    restorer: UnackedRestorer | None,
    service: str,
    nodes: Sequence[str],
    why: str,
    *,
    hosts: Sequence[str] = (),
) -> BackendEvent | None:
    """What a backend calls for workers it knows dead (``why``: how it knows), before it starts
    any replacement: their messages back on their queues, as a ``restored`` event with the count
    (None when they held nothing), or a ``restore-failed`` event (the loop then sweeps again at
    its next cycle; the visibility timeout stays the last net). ``hosts``: the hostnames of the
    dead containers, so a worker whose name was never confirmed is found by its own report
    (``<name>@<hostname>``), not by a guess."""
    if restorer is None or not (nodes or hosts):
        return None
    who = ", ".join([*nodes, *(f"*@{h}" for h in hosts if h)])
    try:
        result = restorer.restore_nodes(nodes, hosts=hosts)
    except Exception as exc:
        return BackendEvent(service, RESTORE_FAILED, f"{who} ({why}): {type(exc).__name__}: {exc}")
    if not result.restored:
        return None
    queues = ", ".join(f"{q} {n}" for q, n in sorted(result.by_queue.items()))
    return BackendEvent(
        service,
        RESTORED,
        f"{result.restored} unacked message(s) of {', '.join(sorted(result.by_node))} ({why}) "
        f"back on their queues ({queues})",
        count=result.restored,
    )


def on_host(node: str, hosts: set[str]) -> bool:
    """Whether Celery node ``node`` (``name@host``) runs on one of ``hosts`` (container
    hostnames: the host part equals one, or is one followed by a domain, as ``%h`` expands)."""
    _, at, host = node.partition("@")
    return bool(at) and (host in hosts or host.split(".", 1)[0] in hosts)


def _hgetall(client: redis.Redis, key: str) -> dict[bytes, bytes]:
    return cast(dict[bytes, bytes], client.hgetall(key))


def _hmget(client: redis.Redis, key: str, fields: list[str]) -> list[bytes | None]:
    return cast(list[bytes | None], client.hmget(key, fields))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _routing_key(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry[2] if isinstance(entry, list) and len(entry) == 3 else None
