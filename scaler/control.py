"""Operator overrides: pause a service (hold its current count) or pin it (hold a fixed count).

Overrides live in Redis, in one hash keyed by service, so every scaler replica sees the same
ones and a takeover keeps them. Each value is JSON: mode, replicas (for a pin), reason, who set it
and when. The loop reads :meth:`ControlStore.controls` every cycle and passes it to the decision
core: paused -> hold with reason "paused by operator", pinned N -> desired N.

Validation happens here, not in the callers (HTTP API, CLI): an unknown service or a pin outside
``[0, max]`` raises an error naming the service, the value and what was expected. What is read
back is validated too, field by field (:meth:`Override.parse`): the hash can be written by anyone
holding Redis credentials that reach it, so a malformed value (``"replicas": -1``, a wrong type, a
service that does not match its field) is reported once, naming the service and the field, and
ignored: the service is decided as if it had no override, and the loop goes on.
"""

from __future__ import annotations

import json
import logging
import math
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
# there was nothing, or an error reply naming the other mode so the caller can explain. A value
# that is not a JSON object (malformed: the loop ignores it) is cleared by either verb.
_CLEAR_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return nil end
local ok, value = pcall(cjson.decode, raw)
local mode = ok and type(value) == 'table' and value['mode'] or ARGV[2]
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


class InvalidOverride(ValueError):
    """A stored override that cannot be used; names the service and the field."""

    def __init__(self, service: str, field: str, problem: str) -> None:
        super().__init__(f"override for {service!r}: {field}: {problem}")
        self.service = service
        self.field = field


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
        """Parse a value written by :meth:`as_json`; InvalidOverride names the bad field."""
        return cls.parse(raw)

    @classmethod
    def parse(cls, raw: str | bytes, service: str | None = None) -> Override:
        """Parse and check one stored value, strictly: the same bounds :class:`ControlStore`'s
        writers enforce, except the max (the loop clamps a pin above a lowered max). ``service``
        is the hash field the value was stored under; the value must name the same one."""
        where = service if service is not None else "?"
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidOverride(where, "value", f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InvalidOverride(where, "value", f"expected a JSON object, got {data!r:.60}")
        named = data.get("service")
        if not isinstance(named, str) or (service is not None and named != service):
            raise InvalidOverride(
                where, "service", f"{named!r:.60} does not match the field it is stored under"
            )
        mode = data.get("mode")
        if mode not in ("pause", "pin"):
            raise InvalidOverride(named, "mode", f"expected 'pause' or 'pin', got {mode!r:.60}")
        replicas = data.get("replicas")
        if mode == "pin":
            # bool is an int in Python; a JSON `true` is not a replica count.
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
                raise InvalidOverride(
                    named, "replicas", f"expected an integer >= 0 for a pin, got {replicas!r:.60}"
                )
        elif replicas is not None:
            raise InvalidOverride(
                named, "replicas", f"expected null for a pause, got {replicas!r:.60}"
            )
        texts = {}
        for name in ("reason", "by"):
            value = data.get(name, "")
            if not isinstance(value, str) or len(value) > MAX_TEXT:
                raise InvalidOverride(
                    named, name, f"expected a string of at most {MAX_TEXT} characters"
                )
            texts[name] = value
        at = data.get("at", 0.0)
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise InvalidOverride(named, "at", f"expected a finite number, got {at!r:.60}")
        return cls(named, mode, replicas, texts["reason"], texts["by"], float(at))


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
        # Stored values refused by the last read: service -> why. Each distinct value is
        # reported once (log + new_rejections), not every cycle it stays there.
        self.rejected: dict[str, str] = {}
        self._reported: dict[str, bytes] = {}
        self._fresh: list[InvalidOverride] = []

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
        rejected: dict[str, str] = {}
        for field, value in raw.items():
            service = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
            try:
                override = Override.parse(value, service)
            except InvalidOverride as exc:
                rejected[service] = str(exc)
                self._reject(service, value, exc)
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
        self.rejected = rejected
        for gone in set(self._reported) - set(rejected):
            del self._reported[gone]  # fixed or removed: report it again if it comes back
        return result

    def new_rejections(self) -> list[InvalidOverride]:
        """Stored overrides refused since the last call, each distinct value once (the loop
        puts them in its event feed)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def controls(self) -> dict[str, ServiceControl]:
        """:meth:`overrides` in the decision core's form, for ``decide(..., controls=...)``."""
        return {service: o.as_control() for service, o in self.overrides().items()}

    # -- internals ------------------------------------------------------------------------------

    def _reject(self, service: str, value: bytes | str, exc: InvalidOverride) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if self._reported.get(service) == raw:
            return
        self._reported[service] = raw
        self._fresh.append(exc)
        report = {"event": "override-rejected", "key": self.key, "service": service}
        report.update(field=exc.field, error=str(exc), effect="ignored")
        log.warning(json.dumps(report))

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
        try:
            removed = Override.parse(raw, service)
        except InvalidOverride:  # a malformed value of that mode: gone now, which was the point
            removed = Override(service, mode, None, "(malformed value removed)", "?", 0.0)
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
