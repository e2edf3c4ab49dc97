"""Workers left consuming nothing by a drain cut short: found by asking them, given queues back.

A scale-down drains a worker in two steps: cancel its consumers, then stop it once idle. A scaler
that dies between the two (or a drain that fails after the cancel) leaves the worker running,
counted as a replica, taking no work; a restarted or newly elected scaler cannot see that in the
container or process list. So on adoption the backends ask their managed workers which queues
they consume (one ``active_queues`` request addressed to them, short timeout) and give each
worker that consumes none of its service's queues those queues back (``add_consumer``).

Why re-add rather than finish the drain: re-adding is right whatever the desired count is (the
worker is healthy and already counted as a replica), while finishing the drain would need the
desired count, which only the decision core knows. If the service is above its desired count,
the core's next scale-down drains a replica the normal way, idle ones first. A worker that does
not answer is left alone: it may still be starting, and one that cannot answer cannot be given
queues either. A worker that consumes some of its queues is also left alone: that may be how it
was started, and a drain cancels its queues within milliseconds of each other.

The same rule runs as a standing check (:class:`ConsumerCheck`), at every reconcile, not only on
adoption: a worker can also lose its consumer while everything else about it is fine (a broker
reconnect that brings the connection back without the consumer: celery/celery #8030, #10205,
#10302), and it would count as capacity while its queue grows. Each check is one
``active_queues`` request addressed to the serving workers (neither warm nor draining), which
returns as soon as all of them answered (``limit``); a worker that does not answer costs the
timeout and is asked again at the next check; one that keeps not answering is skipped for 1, 3,
then 7 checks (a booting or frozen worker must not slow every cycle; a frozen one is the
heartbeat rule's). A worker found consuming none of its
service's queues is healed (``add_consumer``, event ``consumers-restored``); if the next check
still finds it consuming none, it is replaced through the backend's own replacement path (drain
if it answers, stop, start another: ``consumer-less-replaced``). A backend without one (Swarm)
heals again and reports ``consumer-less-persists``.

A drain races the check: it cancels the consumers of a worker the listing still showed serving.
So each heal and each replacement happens under the backend's lock, after asking the backend
(``still_serving``) whether the worker is still serving: a scale-down marks its worker draining
under the same lock before its thread cancels anything, so a worker a drain works on never gets
its consumers back, and a drain that begins after a heal cancels what the heal added (the
worker's control messages are handled in order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from scaler.backends.base import BackendEvent
from scaler.fencing import UNFENCED, Fence, LeadershipLost

log = logging.getLogger(__name__)

RESTORED = "consumers-restored"
RESTORE_FAILED = "consumers-restore-failed"
REPLACED = "consumer-less-replaced"
PERSISTS = "consumer-less-persists"
CHECK_FAILED = "consumer-check-failed"
# Event kind -> the ``action`` label of scaler_consumerless_workers (scaler.metrics).
ACTIONS = {
    RESTORED: "restored",
    RESTORE_FAILED: "restore_failed",
    REPLACED: "replaced",
    PERSISTS: "persists",
}
MAX_SKIP = 7  # checks a silent worker is skipped for, at most


@dataclass(frozen=True)
class Restore:
    """One stranded worker and what re-adding its consumers did."""

    node: str
    queues: tuple[str, ...]
    confirmed: bool  # every add_consumer was acknowledged by the worker
    detail: str


def find_stranded(
    app: Any, wanted: Mapping[str, Sequence[str]], timeout_s: float
) -> dict[str, tuple[str, ...]]:
    """Nodes (of ``wanted``: node -> its service's queues) that answer and consume none of them.

    Raises whatever the broker raises: the caller keeps the check pending and tries again.
    """
    if not wanted:
        return {}
    inspect = app.control.inspect(destination=list(wanted), timeout=timeout_s)
    replies: dict[str, list[dict[str, Any]]] = inspect.active_queues() or {}
    stranded: dict[str, tuple[str, ...]] = {}
    for node, queues in wanted.items():
        if node not in replies:
            continue  # no answer: starting, or unreachable; left alone
        consumed = {str(q.get("name")) for q in replies[node] or []}
        if queues and not consumed & set(queues):
            stranded[node] = tuple(queues)
    return stranded


def restore_consumers(app: Any, node: str, queues: Sequence[str], timeout_s: float) -> Restore:
    """Ask ``node`` to consume ``queues`` again; the worker's own queue declarations are used."""
    missing: list[str] = []
    for queue in queues:
        try:
            replies = app.control.add_consumer(
                queue, destination=[node], reply=True, timeout=timeout_s
            )
        except Exception as exc:
            missing.append(f"{queue} ({type(exc).__name__}: {exc})")
            continue
        if not any(node in reply for reply in replies or []):
            missing.append(f"{queue} (no reply)")
    if missing:
        detail = f"{node} consumed none of {list(queues)}; not confirmed: {', '.join(missing)}"
        return Restore(node, tuple(queues), False, detail)
    detail = f"{node} consumed none of {list(queues)}: consumers re-added"
    return Restore(node, tuple(queues), True, detail)


def restore_stranded(
    app: Any, wanted: Mapping[str, Sequence[str]], timeout_s: float
) -> list[Restore]:
    """Find the stranded workers among ``wanted`` and give each its queues back."""
    found = find_stranded(app, wanted, timeout_s)
    return [restore_consumers(app, node, queues, timeout_s) for node, queues in found.items()]


@dataclass
class ConsumerCheck:
    """The standing check of one backend (module docstring): heal, then replace, never twice in
    a row for the same worker without a check that found it consuming between them."""

    app: Any
    timeout_s: float
    _healing: set[str] = field(default_factory=set)  # re-added at the last check it answered
    _silent: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (misses, skip)

    def run(
        self,
        serving: Mapping[str, tuple[str, Sequence[str]]],
        *,
        lock: AbstractContextManager[Any],
        still_serving: Callable[[str], bool],
        replace: Callable[[str], str] | None = None,
        fence: Fence = UNFENCED,
    ) -> list[BackendEvent]:
        """Check ``serving`` (node -> (service, its queues)): heal the workers consuming none,
        replace (``replace(node)``, its detail returned) those a heal did not cure. Both run
        under ``lock`` and only while ``still_serving(node)`` holds under it."""
        for node in set(self._silent) - set(serving):
            del self._silent[node]
        self._healing &= set(serving)
        asked = [n for n in serving if self._due(n)]
        if not asked:
            return []
        try:
            inspect = self.app.control.inspect(
                destination=asked, timeout=self.timeout_s, limit=len(asked)
            )
            replies: dict[str, list[dict[str, Any]]] = inspect.active_queues() or {}
        except Exception as exc:  # the broker: checked again at the next reconcile
            log.warning("consumer check of %d workers failed: %s", len(asked), exc)
            services = ",".join(sorted({serving[n][0] for n in asked}))
            detail = f"{type(exc).__name__}: {exc}; checked again at the next reconcile"
            return [BackendEvent(services, CHECK_FAILED, detail)]
        events: list[BackendEvent] = []
        for node in asked:
            service, queues = serving[node]
            if node not in replies:
                misses = self._silent.get(node, (0, 0))[0] + 1
                # One slow answer costs nothing (asked again at the next check); a worker that
                # keeps not answering is skipped for 1, 3, then 7 checks.
                self._silent[node] = (misses, min(2 ** (misses - 1) - 1, MAX_SKIP))
                continue
            self._silent.pop(node, None)
            consumed = {str(q.get("name")) for q in replies[node] or []}
            if not queues or consumed & set(queues):
                self._healing.discard(node)  # consuming (again): healthy
                continue
            try:
                event = self._act(node, service, queues, lock, still_serving, replace, fence)
            except LeadershipLost as exc:
                events.append(BackendEvent(service, "fenced", f"consumer check of {node}: {exc}"))
                break
            if event is not None:
                log.warning("%s %s: %s", event.service, event.kind, event.detail)
                events.append(event)
        return events

    def _due(self, node: str) -> bool:
        """False while a worker that did not answer is skipped (one check fewer each time)."""
        misses, skip = self._silent.get(node, (0, 0))
        if skip:
            self._silent[node] = (misses, skip - 1)
        return not skip

    def _act(
        self,
        node: str,
        service: str,
        queues: Sequence[str],
        lock: AbstractContextManager[Any],
        still_serving: Callable[[str], bool],
        replace: Callable[[str], str] | None,
        fence: Fence,
    ) -> BackendEvent | None:
        """Heal ``node``, or replace it if the last heal did not hold; None if a drain (or the
        pool) took it since the listing."""
        with lock:
            if not still_serving(node):
                self._healing.discard(node)
                return None
            if node in self._healing and replace is not None:
                fence.check(f"replace {node}, consuming none of {list(queues)} after a heal")
                self._healing.discard(node)
                try:
                    how = replace(node)
                except LeadershipLost:
                    raise
                except Exception as exc:  # the backend: healed, and judged again next check
                    how = f"replacement failed ({type(exc).__name__}: {exc})"
                    restore = restore_consumers(self.app, node, queues, self.timeout_s)
                    self._healing.add(node)
                    return BackendEvent(service, RESTORE_FAILED, f"{how}; {restore.detail}")
                detail = f"{node} consumed none of {list(queues)} again after its consumers "
                return BackendEvent(service, REPLACED, f"{detail}were re-added: {how}")
            fence.check(f"give {node} its queues back ({', '.join(queues)})")
            again = node in self._healing
            restore = restore_consumers(self.app, node, queues, self.timeout_s)
            self._healing.add(node)
        if again:  # no replacement path (Swarm): healed again, and said so
            detail = f"{restore.detail}; it lost them again since the last check"
            return BackendEvent(service, PERSISTS, detail)
        return BackendEvent(service, RESTORED if restore.confirmed else RESTORE_FAILED,
                            restore.detail)  # fmt: skip
