"""Who holds which unacked message: the worker side of issue 12 (restore a dead worker's tasks).

kombu's Redis transport emulates acks: a message a worker takes is written to the ``unacked``
hash (and its delivery time to the ``unacked_index`` sorted set) in one MULTI pipeline
(``QoS.append``) and removed again on ack or reject (``QoS._remove_from_indices``, also used
inside ``restore_by_tag``'s MULTI). Nothing there says *which* worker holds a message, so a
worker that dies without a clean shutdown (SIGKILL, the OOM killer, a lost node) leaves its
messages invisible until the visibility timeout (an hour in this stack).

This module records ``delivery_tag -> Celery node name`` in one more hash,
``<global_keyprefix>unacked_owner`` (the transport option ``unacked_owner_key``), **in the same
pipeline** as kombu's own writes: the entry and its owner appear together and go together,
whatever moment the worker dies at. The scaler (``scaler.restore``) then puts exactly a dead
node's messages back on their queues as soon as it sees that worker's container or process die.

How it is wired, and why this way:

- A :class:`QoS` subclass of kombu's Redis QoS, selected by a :class:`Channel` and
  :class:`Transport` subclass that the app names in ``broker_transport``
  (``services.ownership:Transport``; kombu accepts a ``module:Class`` transport). No monkey
  patching: a process that uses another transport (a client, a test app) is untouched, and the
  class is chosen by configuration, like any kombu transport.
- Removal overrides ``_remove_from_indices`` and only *adds* an ``HDEL`` to the pipeline kombu
  returns, so ack, reject and kombu's own ``restore_by_tag`` (the visibility-timeout sweep) drop
  the owner in their own pipeline or MULTI without any of their code being copied.
- ``append`` has no such seam (kombu builds and executes its pipeline inline), so it is kombu
  5.7's ``append`` with one ``HSET`` more in the pipeline. ``tests/scaler/test_restore.py``
  checks that the entries it writes are byte-for-byte what kombu's own ``append`` writes, so a
  kombu upgrade that changes the format fails a test instead of drifting.
- A process that is not a worker (``node`` unknown) writes exactly what kombu writes.

The node name comes from Celery's ``worker_init`` signal (the worker's own expanded ``-n``).
On that signal the worker also gives back what an earlier run **of the same node name** left
behind (a container restarted in place by Docker's restart policy, a supervisor restarting a
process): at start nothing can be held under its name yet, and node names are unique among live
workers (Celery's own rule; a duplicate is detected by a ping and left alone). And when its
consumer restarts on a new broker connection (Redis restarted or unreachable for a while), the
worker gives back what it recorded but no longer holds (:class:`RestoreOnReconnect`).

Cost on the hot path: one more field in a pipeline that is sent anyway (no extra round trip).
Measured in docs/benchmarks.md (benchmark 4's side-by-side run).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import time
from typing import Any

from celery import bootsteps
from celery.signals import task_postrun, task_prerun, worker_init
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

OWNER_KEY = "unacked_owner"
TRANSPORT = "services.ownership:Transport"

_node: str | None = None  # this process's Celery node name, once it is a worker


class _Ledger:
    """What this process knows of the messages it took, beyond what Celery keeps, for the
    give-back after a reconnect (:func:`restore_after_reconnect`):

    - ``settling``: delivery tags acked (or rejected without requeue) whose removal has not
      reached Redis: the ack is under way, or failed with the connection. Their tasks ran.
    - ``running`` / ``finished``: task ids whose task runs in this process now, or returned here
      and is not acked yet (``task_prerun`` / ``task_postrun``: the threads and solo pools run
      tasks in the worker's own process). On a lost connection Celery "cancels" its running
      late-ack tasks (``worker_cancel_long_running_tasks_on_connection_loss``) and forgets them,
      but a thread cannot be stopped: the task runs on, to its end and its ack.
    - ``task_of``: delivery tag -> task id, for the messages this process took (``tag_of``, the
      reverse, for the per-task signal handlers).
    - ``untracked``: delivery tag -> unacked entry of the messages taken off a queue whose
      ``unacked`` write failed (kombu's BRPOP window: the connection went between the reply and
      the write). Nothing in Redis holds them any more; only this process has their bytes.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settling: set[str] = set()
        self.running: set[str] = set()
        self.finished: set[str] = set()
        self.task_of: dict[str, str] = {}
        self.tag_of: dict[str, str] = {}
        self.untracked: dict[str, str] = {}

    def took(self, tag: str, task_id: str | None) -> None:
        if task_id:
            with self.lock:
                self.task_of[tag] = task_id
                self.tag_of[task_id] = tag

    def done(self, tags: set[str]) -> None:
        """``tags``' entries are gone from Redis (acked, settled or given back)."""
        with self.lock:
            self.settling.difference_update(tags)
            for tag in tags:
                task = self.task_of.pop(tag, "")
                self.finished.discard(task)
                if self.tag_of.get(task) == tag:
                    del self.tag_of[task]

    def ran_or_runs(self, tag: str) -> bool:
        """Whether the task of ``tag`` runs here now, returned here or was acked here."""
        with self.lock:
            task = self.task_of.get(tag)
            return tag in self.settling or task in self.running or task in self.finished

    def split(self) -> tuple[set[str], set[str]]:
        """(tags whose task still runs here, tags to settle: acked, or their task returned)."""
        with self.lock:
            running = {t for t, i in self.task_of.items() if i in self.running}
            finished = {t for t, i in self.task_of.items() if i in self.finished}
            return running, (self.settling | finished) - running


_ledger = _Ledger()


def current_node() -> str | None:
    """The node name owner entries are written under in this process (None: not a worker)."""
    return _node


def set_node(node: str | None) -> None:
    """Set the node name (the ``worker_init`` handler does; tests may too)."""
    global _node
    _node = node


def settling() -> set[str]:
    """The delivery tags acked here whose removal Redis has not confirmed."""
    with _ledger.lock:
        return set(_ledger.settling)


@contextmanager
def _settling_tag(delivery_tag: Any) -> Iterator[None]:
    """``delivery_tag`` counts as settling while the block runs, and after it if it raised."""
    tag = str(delivery_tag)
    with _ledger.lock:
        _ledger.settling.add(tag)
    yield  # an exception leaves the tag settling: the reconnect's give-back settles it
    _ledger.done({tag})


def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        with _ledger.lock:
            _ledger.running.add(task_id)


def _task_returned(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        with _ledger.lock:
            _ledger.running.discard(task_id)
            if task_id in _ledger.tag_of:
                _ledger.finished.add(task_id)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, plus the owner of each unacked message in the same pipelines."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        node = _node
        if node is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(
                    self.unacked_key, delivery_tag, entry
                ).hset(self.channel.unacked_owner_key, delivery_tag, node).execute()
        except Exception:
            # BRPOP took the message off its queue, the write that would hold it failed: kombu
            # drops it (the consumer never sees it). Kept here; the reconnect gives it back.
            with _ledger.lock:
                _ledger.untracked[str(delivery_tag)] = entry
            raise
        virtual.QoS.append(self, message, delivery_tag)
        _ledger.took(str(delivery_tag), (getattr(message, "headers", None) or {}).get("id"))

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        return pipe.hdel(self.channel.unacked_owner_key, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        with _settling_tag(delivery_tag):
            super().ack(delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """kombu's give-back of what a closing channel delivered (at shutdown, and when the
        connection is lost: on Redis it reaches the server when the break is noticed with Redis
        up, as behind Docker after a restart, or on a cut connection), except the messages whose
        task runs here or ran here (:class:`_Ledger`): put back, they would run a second time
        while the first run goes on in its thread, or after it finished. The reconnect's
        give-back settles those that ran; one still running acks at its end."""
        with self.channel.conn_or_acquire(client) as client:
            for tag in self._delivered:
                if not _ledger.ran_or_runs(str(tag)):
                    self.restore_by_tag(tag, client=client)
        self._delivered.clear()

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:  # a give-back: if Redis never gets it, the reconnect's give-back does it
            super().reject(delivery_tag, requeue=True)
            return
        with _settling_tag(delivery_tag):
            super().reject(delivery_tag, requeue=False)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with the owner-recording QoS and the ``unacked_owner_key`` option."""

    QoS = QoS

    unacked_owner_key = OWNER_KEY
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "unacked_owner_key",
    )


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` (select it with ``broker_transport``)."""

    Channel = Channel


def _give_back(
    app: Any, node: str, keep: set[str], check: Callable[[Any], bool], failed: str, done: str
) -> int:
    """Restore what ``node`` holds except ``keep`` (scaler.restore, atomically); the count.

    ``check(restorer)`` may veto (returns False) and may do its part first. Best effort: a
    broker error is logged as ``failed`` and the scaler's restore or the visibility timeout stays
    the net; a restore is logged as ``done`` (with the count)."""
    from scaler.restore import UnackedRestorer  # the one restore module (same image)

    try:
        restorer = UnackedRestorer.for_app(app)
        if restorer is None:
            return 0
        try:
            if not check(restorer):
                return 0
            result = restorer.restore_nodes([node], keep=keep)
        finally:
            restorer.close()
    except Exception as exc:  # never stop a worker or its consumer from starting over this
        log.warning("%s: %s", failed, exc)
        return 0
    if result.restored:
        log.warning(done, result.restored)
    return result.restored


def restore_previous_run(app: Any, node: str) -> int:
    """Give back the messages an earlier run of ``node`` left unacked; the number restored.

    Called at worker start, before the consumer starts, so nothing held under ``node`` can be
    this run's. If another live worker answers to the same name (a misconfiguration Celery warns
    about), nothing is touched.
    """

    def unowned_or_answering(restorer: Any) -> bool:
        if not restorer.owned_by(node):
            return False
        if node in restorer.answering([node]):
            log.warning("unacked messages under %s left alone: a live %s answers", node, node)
            return False
        return True

    return _give_back(
        app, node, set(), unowned_or_answering,
        f"could not restore what an earlier {node} left unacked",
        f"restored %d unacked message(s) an earlier run of {node} left behind",
    )  # fmt: skip


def held_tags(consumer: Any) -> set[str]:
    """The delivery tags this worker still holds: the requests it runs or keeps reserved, and
    whatever the current channel has delivered (nothing yet while the consumer starts)."""
    from celery.worker.state import active_requests, reserved_requests

    tags = set()
    for request in (*active_requests, *reserved_requests):
        message = getattr(request, "message", None)
        if message is not None and message.delivery_tag is not None:
            tags.add(str(message.delivery_tag))
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    qos = getattr(channel, "_qos", None)  # kombu builds it lazily: absent means nothing delivered
    tags.update(str(t) for t in getattr(qos, "_delivered", {}) or {})
    return tags


def restore_after_reconnect(app: Any, node: str, held: set[str]) -> int:
    """Give back what ``node`` (this live worker) left unacked on its lost connection.

    When the broker connection drops, Celery forgets its reserved requests and stops running
    late-ack tasks (``worker_cancel_long_running_tasks_on_connection_loss``), and kombu's own
    give-back at channel close fails while Redis is unreachable: their messages would stay in
    ``unacked`` until the visibility timeout (an hour as shipped). Once connected again the
    worker knows exactly what it still holds (``held``), so every other message under its name
    goes back now, by the same atomic restore the scaler uses.

    Except, by this process's ledger (:class:`_Ledger`), the messages whose tasks still run here
    (Celery cancelled and forgot them, but a thread runs on: kept, the task acks at its end) and
    those whose tasks ran (returned, or acked while the connection went: settled, their entries
    removed as the ack would have). Put back, either would run again while the first run lives
    on or is done: the nemesis campaign's Redis restarts ran such tasks twice.
    """
    running, unsettled = _ledger.split()
    with _ledger.lock:
        untracked = dict(_ledger.untracked)

    def settle_first(restorer: Any) -> bool:
        if untracked:  # before the owner restore: an entry that did reach Redis goes back there
            count = restorer.give_back_untracked(untracked)
            with _ledger.lock:
                for tag in untracked:
                    _ledger.untracked.pop(tag, None)
            if count:
                log.warning(
                    "gave back %d message(s) %s took as its broker connection went", count, node
                )
        if unsettled:
            count = restorer.settle(node, unsettled)
            _ledger.done(unsettled)
            if count:
                log.warning("settled %d ack(s) %s sent as its broker connection went", count, node)
        return True

    keep = held | running | unsettled
    restored = _give_back(
        app, node, keep, settle_first,
        f"could not give back what {node} held on its lost connection",
        f"restored %d unacked message(s) {node} held on its lost broker connection",
    )  # fmt: skip
    with _ledger.lock:  # what went back is no longer this process's
        gone = set(_ledger.task_of) - keep
    _ledger.done(gone)
    return restored


class RestoreOnReconnect(bootsteps.StartStopStep):
    """On every consumer restart after a lost connection, give back what this worker no longer
    holds (see :func:`restore_after_reconnect`); the first start is ``worker_init``'s job.

    It starts after the Tasks step, so ``task_consumer`` is the new connection's (the old one's
    channel still lists the orphaned messages as delivered) and nothing has been consumed on it
    yet: deliveries only come once the event loop runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def include_if(self, parent: Any) -> bool:
        return uses_owner_tracking(parent.app)

    def start(self, parent: Any) -> None:
        node = _node
        if node is None or parent.restart_count < 1:
            return
        restore_after_reconnect(parent.app, node, held_tags(parent))


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None)
    app = getattr(sender, "app", None)
    if not hostname or app is None or not uses_owner_tracking(app):
        return
    set_node(str(hostname))
    restore_previous_run(app, str(hostname))


def uses_owner_tracking(app: Any) -> bool:
    """True when ``app`` consumes through this module's transport."""
    transport = app.conf.broker_transport
    return transport is Transport or transport == TRANSPORT


worker_init.connect(_on_worker_init, weak=False)
task_prerun.connect(_task_started, weak=False)
task_postrun.connect(_task_returned, weak=False)
