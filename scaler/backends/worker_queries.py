"""What the container backends ask the Celery workers themselves, through Celery's control API.

An engine (Compose's or Swarm's) knows containers and tasks, not what a worker is doing: only
the worker can say whether it runs or holds a task, and under which node name. Both container
backends ask the same way, so the questions live here once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from scaler.backends.base import BackendError

log = logging.getLogger(__name__)


def ask_busy(
    app: Any, nodes: list[str], *, timeout_s: float, attempts: int = 3, backoff_s: float = 0.2
) -> dict[str, bool | None]:
    """Per node: True if it runs or holds a task, False if idle, None if it did not answer.

    One ``active`` and one ``reserved`` request addressed to ``nodes``; a broker error is retried
    with backoff, then raised as BackendError (nothing is ever stopped on an unread answer).
    """
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            inspect = app.control.inspect(destination=nodes, timeout=timeout_s)
            active = inspect.active() or {}
            reserved = inspect.reserved() or {}
            break
        except Exception as exc:
            if attempt == attempts:
                raise BackendError(f"ask workers {nodes} for their tasks: {exc}") from exc
            time.sleep(delay)
            delay *= 2
    return {
        node: (bool(active[node]) or bool(reserved[node]))
        if node in active and node in reserved
        else None
        for node in nodes
    }


def names_by_host(app: Any, hosts: Iterable[str], *, timeout_s: float) -> dict[str, str]:
    """Celery node names of the workers on ``hosts`` (container hostnames), from one ping.

    Every worker named with ``%h`` (or by default) has its container's hostname after the
    ``@``; a host with no reply, or more than one, is left out (it may still be starting).
    """
    wanted = set(hosts)
    if not wanted:
        return {}
    try:
        replies = app.control.ping(timeout=timeout_s) or []
    except Exception as exc:
        log.warning("ping broadcast to name workers failed: %s", exc)
        return {}
    found: dict[str, list[str]] = {}
    for reply in replies:
        for node in reply:
            host = node.split("@", 1)[-1].split(".", 1)[0]
            if host in wanted:
                found.setdefault(host, []).append(node)
    return {host: nodes[0] for host, nodes in found.items() if len(nodes) == 1}
