"""The scaler's policy: which worker services it manages and the rules it scales them by.

A YAML file (``scaler/policy.example.yaml`` documents every field) is validated here into frozen
pydantic models, so the decision core (``scaler.decide``) can trust every number it reads. Errors
are collected, one line per problem, each naming the path, the value and what was expected, because
an operator fixing a policy wants all the mistakes at once, not one per attempt.

Precedence of values, lowest first: built-in defaults, the seed's environment variables
(``MIN_WORKERS``, ``MAX_WORKERS``, ``CPU_THRESHOLD``, ``MEMORY_THRESHOLD``, ``QUEUE_THRESHOLD``),
the file's top-level ``defaults:`` section, then each service's own fields.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scaler.problems import (
    Problems,
    WordedProblems,
    parse_yaml,
    read_text_file,
    validation_lines,
)

__all__ = [
    "ENV_DEFAULTS",
    "CloneRules",
    "EmergencyRule",
    "HostLimits",
    "Policy",
    "PolicyError",
    "ResourceLimits",
    "ScaleRule",
    "ScaleToZero",
    "ServicePolicy",
    "Target",
    "WakeupRules",
    "load_policy",
    "parse_policy",
    "validate_file",
]


class PolicyError(Problems):
    """A policy that cannot be used. ``problems`` holds one line per mistake."""


class _Model(BaseModel):
    """Frozen, strict about unknown keys: a typo must be an error, not a silently ignored rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Model):
    """What one replica should carry: a backlog per replica and/or a latency objective."""

    # ceil(work / tasks_per_replica) replicas, work = waiting + in flight over the service's queues.
    tasks_per_replica: float | None = Field(default=10.0, gt=0)
    # The oldest waiting message should be younger than this; older adds a replica.
    latency_s: float | None = Field(default=None, gt=0)
    # Dead band: no change while work / (tasks_per_replica * current) is within 1 +/- tolerance.
    tolerance: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_objective(self) -> Target:
        if self.tasks_per_replica is None and self.latency_s is None:
            raise ValueError("expected tasks_per_replica and/or latency_s to be set")
        return self


class ScaleRule(_Model):
    """How fast one direction may move: a stabilisation window, a cooldown and a step limit."""

    # Up: the lowest recommendation in the window wins; down: the highest. 0 disables.
    stabilization_s: float = Field(ge=0)
    # Seconds after any scaling action before another action in this direction.
    cooldown_s: float = Field(ge=0)
    # Largest change in one action, in replicas and/or percent of the current count.
    max_step: int | None = Field(default=None, ge=1)
    max_step_percent: float | None = Field(default=None, gt=0)
    # With both limits set: "max" allows the larger (Kubernetes HPA's default), "min" the smaller.
    select: Literal["max", "min"] = "max"

    def step_limit(self, current: int) -> int | None:
        """Largest change allowed from ``current`` replicas; None means unlimited; at least 1."""
        limits: list[int] = []
        if self.max_step is not None:
            limits.append(self.max_step)
        if self.max_step_percent is not None:
            limits.append(max(1, math.ceil(current * self.max_step_percent / 100.0)))
        if not limits:
            return None
        return max(limits) if self.select == "max" else min(limits)


# Built-in rules, also the lowest merge layer, so a file can override one field of a rule.
_UP_DEFAULT: dict[str, Any] = {
    "stabilization_s": 0.0,
    "cooldown_s": 5.0,
    "max_step": 4,
    "max_step_percent": 100.0,
}
_DOWN_DEFAULT: dict[str, Any] = {"stabilization_s": 120.0, "cooldown_s": 30.0, "max_step": 1}
_BUILTIN_SERVICE: dict[str, Any] = {"scale_up": _UP_DEFAULT, "scale_down": _DOWN_DEFAULT}


def _up_default() -> ScaleRule:
    return ScaleRule(**_UP_DEFAULT)


def _down_default() -> ScaleRule:
    return ScaleRule(**_DOWN_DEFAULT)


class ScaleToZero(_Model):
    """Only used when min_replicas is 0: how long a service must be idle before it goes to zero."""

    idle_s: float = Field(default=300.0, ge=0)


class EmergencyRule(_Model):
    """A backlog or age on one queue that justifies jumping past the normal step at once."""

    queue: str = Field(min_length=1)
    depth: int | None = Field(default=None, ge=1)  # waiting messages on that queue
    latency_s: float | None = Field(default=None, gt=0)  # age of its oldest waiting message
    scale_to: int | None = Field(default=None, ge=1)  # replicas to jump to; default max_replicas

    @model_validator(mode="after")
    def _one_threshold(self) -> EmergencyRule:
        if self.depth is None and self.latency_s is None:
            raise ValueError("expected depth and/or latency_s to be set")
        return self


class ResourceLimits(_Model):
    """Per-worker limits (mean over the service's replicas), in percent."""

    # Workers above this while work is waiting: add a replica (they are saturated).
    cpu_percent: float = Field(default=80.0, gt=0, le=100)
    memory_percent: float = Field(default=85.0, gt=0, le=100)


class HostLimits(_Model):
    """Host limits, in percent: past either one no service scales up, and one may give way."""

    cpu_percent: float = Field(default=90.0, gt=0, le=100)
    memory_percent: float = Field(default=90.0, gt=0, le=100)


class ServicePolicy(_Model):
    """The complete, defaults-merged rules for one worker service."""

    queues: list[str] = Field(min_length=1)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=10, ge=1)
    target: Target = Field(default_factory=Target)
    scale_up: ScaleRule = Field(default_factory=_up_default)
    scale_down: ScaleRule = Field(default_factory=_down_default)
    scale_to_zero: ScaleToZero = Field(default_factory=ScaleToZero)
    emergency: EmergencyRule | None = None
    resources: ResourceLimits = Field(default_factory=ResourceLimits)
    # Higher is more urgent; under host pressure the least urgent service gives way first.
    urgency: int = 0
    # Replicas booted and healthy but consuming nothing (the warm pool): a scale-up takes them
    # first, in milliseconds, and the pool is refilled with cold starts. Serving + warm replicas
    # stay within max_replicas.
    warm: int = Field(default=0, ge=0)
    # Keep the warm replicas while the service is at zero (fast wake, at the cost of their memory).
    warm_at_zero: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ServicePolicy:
        problems: list[str] = []
        if self.max_replicas < self.min_replicas:
            problems.append(
                f"max_replicas: {self.max_replicas} is invalid: "
                f"must be >= min_replicas ({self.min_replicas})"
            )
        if self.warm and self.min_replicas + self.warm > self.max_replicas:
            problems.append(
                f"warm: {self.warm} is invalid: min_replicas + warm ({self.min_replicas} + "
                f"{self.warm}) must be <= max_replicas ({self.max_replicas}); warm replicas count "
                "against the maximum"
            )
        if len(set(self.queues)) != len(self.queues):
            problems.append(f"queues: {self.queues!r} is invalid: names must be unique")
        if any(not q.strip() for q in self.queues):
            problems.append(f"queues: {self.queues!r} is invalid: names must be non-empty")
        if self.emergency is not None:
            if self.emergency.queue not in self.queues:
                problems.append(
                    f"emergency.queue: {self.emergency.queue!r} is invalid: "
                    f"must be one of this service's queues {self.queues!r}"
                )
            st = self.emergency.scale_to
            if st is not None and not self.min_replicas <= st <= self.max_replicas:
                problems.append(
                    f"emergency.scale_to: {st} is invalid: must be within "
                    f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
                )
        if problems:
            raise WordedProblems(problems)
        return self


class CloneRules(_Model):
    """What a clone of a worker's container may carry over from its template."""

    # Host paths (absolute; a path inside one is allowed too) that a template's bind mounts may
    # come from. Any other bind mount, and privileged mode, added capabilities, devices or host
    # namespaces, make the scaler refuse to clone (scaler.backends.template_safety).
    allowed_bind_mounts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _absolute(self) -> CloneRules:
        problems = []
        for i, path in enumerate(self.allowed_bind_mounts):
            parts = path.split("/")
            if not path.startswith("/") or ".." in parts:
                problems.append(
                    f"allowed_bind_mounts.{i}: {path!r} is invalid: expected an absolute host "
                    "path without '..'"
                )
            elif path.strip("/") == "":
                problems.append(
                    f"allowed_bind_mounts.{i}: {path!r} is invalid: '/' would allow every host "
                    "path; name the directories the workers need"
                )
        if problems:
            raise WordedProblems(problems)
        return self


class WakeupRules(_Model):
    """Event-driven detection (scaler.wakeup): a message landing on the queue of a service at its
    minimum or below its target starts that service's decision at once, not at the next tick."""

    events: bool = True
    # Arrivals within this window after a wake-up fold into one more decision at its end, so a
    # flood costs about one decision per service per window, not one per message.
    debounce_s: float = Field(default=0.2, gt=0, le=10)


class Policy(_Model):
    """The whole policy: cycle timing, host limits and one entry per managed worker service."""

    interval_s: float = Field(default=2.0, gt=0)
    # A signal read longer ago than this counts as missing (the core then holds).
    stale_after_s: float = Field(default=10.0, gt=0)
    # A worker whose heartbeat is older than this is drained if it answers, else stopped, and
    # replaced (its unacked tasks restored); null: never. Above the workers' heartbeat interval.
    unresponsive_after_s: float | None = Field(default=90.0, gt=0)
    host: HostLimits = Field(default_factory=HostLimits)
    clone: CloneRules = Field(default_factory=CloneRules)
    wakeup: WakeupRules = Field(default_factory=WakeupRules)
    services: dict[str, ServicePolicy] = Field(min_length=1)

    @model_validator(mode="after")
    def _queues_owned_once(self) -> Policy:
        # One owner per queue: two services scaling on the same backlog would both add replicas
        # for it, doubling the fleet the target asks for.
        owner: dict[str, str] = {}
        problems: list[str] = []
        for name, svc in self.services.items():
            for i, q in enumerate(svc.queues):
                if q in owner:
                    problems.append(
                        f"services.{name}.queues.{i}: {q!r} is invalid: already consumed by "
                        f"{owner[q]}; a queue may belong to one service only"
                    )
                else:
                    owner[q] = name
        if self.stale_after_s < self.interval_s:
            problems.append(
                f"stale_after_s: {self.stale_after_s} is invalid: must be >= interval_s "
                f"({self.interval_s}), or every signal would count as stale"
            )
        if problems:
            raise WordedProblems(problems)
        return self


# --- environment defaults (the seed's variables) ---

#: Variable -> (where it lands, what it must be). Documented in docs/scaler-policy.md.
ENV_DEFAULTS: dict[str, str] = {
    "MIN_WORKERS": "defaults.min_replicas (integer >= 0)",
    "MAX_WORKERS": "defaults.max_replicas (integer >= 1)",
    "CPU_THRESHOLD": "host.cpu_percent and defaults.resources.cpu_percent (number in (0, 100])",
    "MEMORY_THRESHOLD": (
        "host.memory_percent and defaults.resources.memory_percent (number in (0, 100])"
    ),
    "QUEUE_THRESHOLD": "defaults.target.tasks_per_replica (number > 0)",
}


def _env_number(
    env: Mapping[str, str],
    name: str,
    parse: Callable[[str], float],
    valid: Callable[[float], bool],
    expected: str,
    problems: list[str],
) -> float | None:
    """One seed variable: None when unset, the value when ``valid``, else a problem naming it."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = parse(raw.strip())
    except ValueError:
        value = math.nan
    if not valid(value):
        problems.append(f"{name}: {raw!r} is invalid: expected {expected}")
        return None
    return value


def _env_int(env: Mapping[str, str], name: str, minimum: int, problems: list[str]) -> int | None:
    value = _env_number(
        env, name, int, lambda v: v >= minimum, f"an integer >= {minimum}", problems
    )
    return None if value is None else int(value)


def _env_percent(env: Mapping[str, str], name: str, problems: list[str]) -> float | None:
    return _env_number(
        env, name, float, lambda v: 0 < v <= 100, "a percentage in (0, 100]", problems
    )


def _env_positive(env: Mapping[str, str], name: str, problems: list[str]) -> float | None:
    return _env_number(
        env, name, float, lambda v: v > 0 and math.isfinite(v), "a number > 0", problems
    )


def _env_layer(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The seed's variables as (host defaults, service defaults); raises PolicyError if bad."""
    problems: list[str] = []
    host: dict[str, Any] = {}
    svc: dict[str, Any] = {}
    lo = _env_int(env, "MIN_WORKERS", 0, problems)
    hi = _env_int(env, "MAX_WORKERS", 1, problems)
    cpu = _env_percent(env, "CPU_THRESHOLD", problems)
    mem = _env_percent(env, "MEMORY_THRESHOLD", problems)
    queue = _env_positive(env, "QUEUE_THRESHOLD", problems)
    if lo is not None and hi is not None and hi < lo:
        problems.append(
            f"MAX_WORKERS: {env['MAX_WORKERS']!r} is invalid: "
            f"must be >= MIN_WORKERS ({env['MIN_WORKERS']})"
        )
    if problems:
        raise PolicyError(problems)
    if lo is not None:
        svc["min_replicas"] = lo
    if hi is not None:
        svc["max_replicas"] = hi
    if cpu is not None:
        host["cpu_percent"] = cpu
        svc.setdefault("resources", {})["cpu_percent"] = cpu
    if mem is not None:
        host["memory_percent"] = mem
        svc.setdefault("resources", {})["memory_percent"] = mem
    if queue is not None:
        svc["target"] = {"tasks_per_replica": queue}
    return host, svc


# --- merging and error wording ---


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings: ``over`` wins; lists and scalars are replaced, not concatenated."""
    out: dict[str, Any] = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_policy(data: object, env: Mapping[str, str] | None = None) -> Policy:
    """Validate a policy given as plain data (what ``yaml.safe_load`` returns).

    ``env`` supplies the seed's variables (default: ``os.environ``). Raises PolicyError listing
    every problem, each line naming the path, the value and what was expected.
    """
    env = os.environ if env is None else env
    if not isinstance(data, Mapping):
        raise PolicyError(
            [f"(top level): {type(data).__name__} is invalid: expected a mapping of policy fields"]
        )
    problems: list[str] = []
    host_env: dict[str, Any] = {}
    svc_env: dict[str, Any] = {}
    try:
        host_env, svc_env = _env_layer(env)
    except PolicyError as exc:
        problems.extend(exc.problems)

    defaults = data.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, Mapping):
        problems.append(f"defaults: {defaults!r} is invalid: expected a mapping of service fields")
        defaults = {}
    services = data.get("services")
    if not isinstance(services, Mapping) or not services:
        problems.append(
            f"services: {services!r} is invalid: expected a non-empty mapping of "
            "worker service name to its rules"
        )
        services = {}

    merged_services: dict[str, Any] = {}
    for name, raw in services.items():
        if not isinstance(name, str) or not name:
            problems.append(f"services.{name}: {name!r} is invalid: a service name is a string")
            continue
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            problems.append(f"services.{name}: {raw!r} is invalid: expected a mapping of fields")
            continue
        merged_services[name] = _merge(_merge(_merge(_BUILTIN_SERVICE, svc_env), defaults), raw)

    top: dict[str, Any] = {k: v for k, v in data.items() if k != "defaults"}
    top["services"] = merged_services
    if "host" in data and isinstance(data["host"], Mapping):
        top["host"] = _merge(host_env, data["host"])
    elif "host" not in data and host_env:
        top["host"] = host_env

    try:
        policy = Policy.model_validate(top)
    except ValidationError as exc:
        problems.extend(validation_lines(exc))
    if problems:
        raise PolicyError(problems)
    return policy


def load_policy(path: str | Path, env: Mapping[str, str] | None = None) -> Policy:
    """Read and validate a YAML policy file; raises PolicyError naming the file on any problem."""
    p = Path(path)
    data = parse_yaml(read_text_file(p, "policy file", PolicyError), p, PolicyError)
    return parse_policy(data, env)


def validate_file(path: str | Path, env: Mapping[str, str] | None = None) -> list[str]:
    """What ``scaler validate FILE`` prints: one line per problem; empty when the file is good."""
    try:
        load_policy(path, env)
    except PolicyError as exc:
        return list(exc.problems)
    return []
