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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


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
    detail = f"{node} consumed none of {list(queues)} (a drain cut short?): consumers re-added"
    return Restore(node, tuple(queues), True, detail)


def restore_stranded(
    app: Any, wanted: Mapping[str, Sequence[str]], timeout_s: float
) -> list[Restore]:
    """Find the stranded workers among ``wanted`` and give each its queues back."""
    found = find_stranded(app, wanted, timeout_s)
    return [restore_consumers(app, node, queues, timeout_s) for node, queues in found.items()]
