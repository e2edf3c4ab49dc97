"""Operator overrides: pause a service (hold its current count) or pin it (hold a fixed count).

Overrides live in Redis, in one hash keyed by service, so every scaler replica sees the same
ones and a takeover keeps them. Each value is JSON: mode, replicas (for a pin), reason, who set it
and when. The loop reads :meth:`ControlStore.controls` every cycle and passes it to the decision
core: paused -> hold with reason "paused by operator", pinned N -> desired N.

Validation happens here, not in the callers (HTTP API, CLI): an unknown service or a pin outside
``[0, max]`` raises an error naming the service, the value and what was expected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import redis

from scaler.decide import ServiceControl

log = logging.getLogger(__name__)

Mode = Literal["pause", "pin"]
MAX_TEXT = 200  # reason / who: enough for a sentence, small enough for logs and status

# KEYS[1] = hash, ARGV[1] = service, ARGV[2] = mode to clear. Returns the removed JSON, nil when
# there was nothing, or an error reply naming the other mode so the caller can explain.
_CLEAR_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return nil end
local mode = cjson.decode(raw)['mode']
if mode ~= ARGV[2] then return redis.error_reply('MODE ' .. tostring(mode)) end
redis.call('HDEL', KEYS[1], ARGV[1])
return raw
"""


class ControlError(ValueError):
    """A control request that cannot be applied; the message says why, for the operator."""


class UnknownServiceError(ControlError):
    pass


class ConflictError(ControlError):
    """E.g. resume on a pinned service: the operator asked for the other kind of undo."""


class ControlUnavailable(RuntimeError):
    """Redis could not be read or written. The loop should hold every service: an operator may
    have paused one and we cannot tell."""


@dataclass(frozen=True)
class Override:
    """One operator override for one service."""

    service: str
    mode: Mode
    replicas: int | None  # the pinned count; None for a pause
    reason: str
    by: str
    at: float  # wall-clock seconds when it was set

    @property
    def explanation(self) -> str:
        """The words the decision core puts in its reasons."""
        what = "paused by operator" if self.mode == "pause" else f"pinned to {self.replicas}"
        extra = f": {self.reason}" if self.reason else ""
        return f"{what} ({self.by}){extra}"

    def as_control(self) -> ServiceControl:
        """The decision core's form (scaler.decide.ServiceControl)."""
        note = f"{self.by}: {self.reason}" if self.reason else self.by
        if self.mode == "pause":
            return ServiceControl(paused=True, note=note)
        return ServiceControl(pinned=self.replicas, note=note)

    def as_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "mode": self.mode,
            "replicas": self.replicas,
            "reason": self.reason,
            "by": self.by,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, raw: str | bytes) -> Override:
        data = json.loads(raw)
        mode = data["mode"]
        if mode not in ("pause", "pin"):
            raise ValueError(f"override mode must be 'pause' or 'pin', got {mode!r}")
        replicas = data.get("replicas")
        return cls(
            service=str(data["service"]),
            mode=mode,
            replicas=None if replicas is None else int(replicas),
            reason=str(data.get("reason", "")),
            by=str(data.get("by", "")),
            at=float(data.get("at", 0.0)),
        )


ServiceLimits = Mapping[str, int] | Callable[[], Mapping[str, int]]


class ControlStore:
    """Pause/pin per service, in a Redis hash at ``{prefix}scaler:overrides``.

    ``limits`` maps each managed service to its max replicas (from the policy); pass a callable
    to follow policy reloads.
    """

    def __init__(
        self,
        client: redis.Redis,
        limits: ServiceLimits,
        *,
        prefix: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.key = f"{prefix}scaler:overrides"
        self._limits = limits
        self._clock = clock
        self._clear = client.register_script(_CLEAR_LUA)

    @classmethod
    def from_url(cls, url: str, limits: ServiceLimits, **kwargs: Any) -> ControlStore:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, limits, **kwargs)

    def limits(self) -> Mapping[str, int]:
        return self._limits() if callable(self._limits) else self._limits

    # -- writes ---------------------------------------------------------------------------------

    def pause(self, service: str, *, by: str, reason: str = "") -> Override:
        """Hold the service at whatever count it has; replaces a pin."""
        self._check_service(service)
        return self._put(Override(service, "pause", None, _text("reason", reason), _by(by), 0.0))

    def pin(self, service: str, replicas: object, *, by: str, reason: str = "") -> Override:
        """Hold the service at exactly ``replicas``; replaces a pause or an earlier pin."""
        top = self._check_service(service)
        # bool is an int in Python; a JSON `true` is not a replica count.
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise ControlError(
                f"replicas for service {service!r} must be an integer in [0, {top}], "
                f"got {replicas!r}"
            )
        if not 0 <= replicas <= top:
            raise ControlError(
                f"replicas for service {service!r} must be in [0, {top}] (its max replicas), "
                f"got {replicas}"
            )
        return self._put(Override(service, "pin", replicas, _text("reason", reason), _by(by), 0.0))

    def resume(self, service: str) -> Override | None:
        """Undo a pause. Returns what was removed, None if the service was not paused."""
        return self._clear_mode(service, "pause")

    def unpin(self, service: str) -> Override | None:
        """Undo a pin. Returns what was removed, None if the service was not pinned."""
        return self._clear_mode(service, "pin")

    # -- reads ----------------------------------------------------------------------------------

    def overrides(self) -> dict[str, Override]:
        """Every override for a currently managed service. A pin above a max lowered since (by a
        policy reload) is clamped to the new max, and says so. Raises ControlUnavailable."""
        try:
            raw: dict[Any, Any] = self.client.hgetall(self.key)  # type: ignore[assignment]
        except (redis.RedisError, OSError) as exc:
            raise ControlUnavailable(f"cannot read overrides from {self.key}: {exc}") from exc
        limits = self.limits()
        result: dict[str, Override] = {}
        for field, value in raw.items():
            service = field.decode() if isinstance(field, bytes) else str(field)
            try:
                override = Override.from_json(value)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable override for %r in %s: %s", service, self.key, exc)
                continue
            if service not in limits:
                log.info("ignoring override for %r: not a managed service any more", service)
                continue
            top = limits[service]
            if override.replicas is not None and override.replicas > top:
                override = replace(
                    override,
                    replicas=top,
                    reason=f"{override.reason} (pin {override.replicas} clamped to max {top})",
                )
            result[service] = override
        return result

    def controls(self) -> dict[str, ServiceControl]:
        """:meth:`overrides` in the decision core's form, for ``decide(..., controls=...)``."""
        return {service: o.as_control() for service, o in self.overrides().items()}

    # -- internals ------------------------------------------------------------------------------

    def _check_service(self, service: str) -> int:
        limits = self.limits()
        if service not in limits:
            raise UnknownServiceError(
                f"service {service!r} is not managed by the scaler; expected one of "
                f"{sorted(limits)}"
            )
        return limits[service]

    def _put(self, override: Override) -> Override:
        stamped = replace(override, at=self._clock())
        try:
            self.client.hset(self.key, stamped.service, json.dumps(stamped.as_json()))
        except (redis.RedisError, OSError) as exc:
            raise ControlUnavailable(f"cannot write override to {self.key}: {exc}") from exc
        log.info("override set: %s %s", stamped.service, stamped.explanation)
        return stamped

    def _clear_mode(self, service: str, mode: Mode) -> Override | None:
        self._check_service(service)
        try:
            raw = self._clear(keys=[self.key], args=[service, mode])
        except redis.ResponseError as exc:
            if not str(exc).startswith("MODE "):
                raise ControlUnavailable(f"cannot clear override in {self.key}: {exc}") from exc
            other = str(exc).removeprefix("MODE ").strip()
            undo = "resume" if other == "pause" else "unpin"
            raise ConflictError(
                f"service {service!r} has a {other} override, not a {mode}; use {undo}"
            ) from exc
        except (redis.RedisError, OSError) as exc:
            raise ControlUnavailable(f"cannot clear override in {self.key}: {exc}") from exc
        if raw is None:
            return None
        removed = Override.from_json(raw)
        log.info("override cleared: %s was %s", service, removed.explanation)
        return removed


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ControlError(f"{name} must be a string, got {value!r}")
    if len(value) > MAX_TEXT:
        raise ControlError(f"{name} must be at most {MAX_TEXT} characters, got {len(value)}")
    return value


def _by(value: object) -> str:
    text = _text("by", value)
    if not text.strip():
        raise ControlError("by (who sets the override) must be a non-empty string, got ''")
    return text
