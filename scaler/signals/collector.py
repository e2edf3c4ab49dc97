"""Assembles one cycle's Observations from the broker, the backend and the host.

Every reading that fails is recorded as missing (None) with a line in ``Observations.errors``;
nothing here guesses a zero. The queue reader is chosen from the Celery app's own broker settings,
so the scaler counts keys exactly as the workers' transport lays them out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from scaler.backends.base import Backend
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation
from scaler.signals.rabbitmq_queues import CeleryInFlight, RabbitQueueReader
from scaler.signals.redis_queues import DEFAULT_SEP, DEFAULT_STEPS, RedisQueueReader
from scaler.signals.resources import HostStats


class QueueReader(Protocol):
    """Anything that reads queue signals for a list of queues in one go."""

    def read(self, queues: Sequence[str]) -> dict[str, QueueSignal]: ...


# Past the hard time limit, how long a live worker may still hold a due task's unacked entry:
# the pool kills the task at the limit, then the worker records the failure and acks.
ABANDON_MARGIN_S = 60.0


def abandon_after_s(app: Any, margin_s: float = ABANDON_MARGIN_S) -> float | None:
    """The longest a live worker of ``app`` can hold a due task: its hard time limit
    (``task_time_limit``) plus ``margin_s``; None when the app sets no hard limit (then no
    unacked entry is ever taken for a dead worker's)."""
    limit = app.conf.task_time_limit
    if limit is None or float(limit) <= 0:
        return None
    return float(limit) + margin_s


def queue_reader_for_app(app: Any, *, abandon_margin_s: float = ABANDON_MARGIN_S) -> QueueReader:
    """The reader matching the app's broker: Redis (with its key prefix and priority layout, and
    the bound past which an unacked entry is a dead worker's, from the app's hard time limit)
    or RabbitMQ (depth by passive declare, in-flight through Celery's control API; the broker
    requeues a dead consumer's messages itself)."""
    url = str(app.conf.broker_url or "")
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        options = app.conf.broker_transport_options or {}
        return RedisQueueReader.from_url(
            url,
            key_prefix=str(options.get("global_keyprefix", "")),
            sep=str(options.get("sep", DEFAULT_SEP)),
            steps=tuple(options.get("priority_steps", DEFAULT_STEPS)),
            abandon_after_s=abandon_after_s(app, abandon_margin_s),
        )
    if scheme in ("amqp", "amqps", "pyamqp"):
        return RabbitQueueReader(url, in_flight=CeleryInFlight(app))
    raise ValueError(
        f"broker_url scheme {scheme!r} is not supported by the scaler: expected redis://, "
        "rediss:// or amqp://"
    )


@dataclass
class Collector:
    """Reads everything one decision needs."""

    queues: QueueReader
    host: HostStats = field(default_factory=HostStats)
    clock: Callable[[], float] = time.monotonic  # Observations.at and fallback read_at stamps

    def collect(self, services: Mapping[str, Sequence[str]], backend: Backend) -> Observations:
        """Observations for ``services`` (service name -> its queues)."""
        now = self.clock()
        errors: list[str] = []
        all_queues = sorted({q for qs in services.values() for q in qs})
        signals = self.queues.read(all_queues)
        unreadable = [q for q in all_queues if signals[q].waiting is None]
        if unreadable:
            errors.append(f"broker: depth of {', '.join(unreadable)} unreadable")
        no_flight = [q for q in all_queues if q not in unreadable and signals[q].in_flight is None]
        if no_flight:
            errors.append(f"broker: in-flight of {', '.join(no_flight)} unreadable")
        observed: dict[str, ServiceObservation] = {}
        for service, queues in services.items():
            replicas: int | None
            try:
                replicas = backend.replicas(service)
            except Exception as exc:
                replicas = None
                errors.append(f"backend: replicas of {service} unreadable: {exc}")
            warm = 0
            try:  # a backend without a pool (no warm()) has none
                warm = backend.warm(service) if hasattr(backend, "warm") else 0
            except Exception as exc:  # replicas() reads the same pool: it says so too
                replicas = None
                errors.append(f"backend: warm pool of {service} unreadable: {exc}")
            try:
                workers = backend.resources(service)
            except Exception as exc:
                workers = Resources(None, None, read_at=now)
                errors.append(f"backend: resources of {service} unreadable: {exc}")
            observed[service] = ServiceObservation(
                service=service,
                replicas=replicas,
                queues={q: signals[q] for q in queues},
                workers=workers,
                warm=warm,
            )
        return Observations(
            at=now, services=observed, host=self._host(backend, errors), errors=tuple(errors)
        )

    def _host(self, backend: Backend, errors: list[str]) -> Resources:
        """The host guard's reading: the backend's own when it spans several machines (Swarm:
        the node with the most room), else (or before any node reported) this machine's."""
        reader = getattr(backend, "host_resources", None)
        if reader is not None:
            try:
                reading = reader()
            except Exception as exc:
                errors.append(f"backend: node resources unreadable: {exc}")
            else:
                if reading is not None:
                    return cast(Resources, reading)
        return self.host.read()
