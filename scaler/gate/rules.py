"""The gate's fixed rules: what is managed, how a caller's input is read, what leaves the gate.

A container or service is managed when it carries ``autoscale.managed=true`` and the scope label
of the gate's own project (``com.docker.compose.project``) or stack
(``com.docker.stack.namespace``); a Compose one-off (``docker compose run``) never is. Caller
filters are parsed strictly and the scope's labels are added to them, so they can only narrow.
What the engine answers is reduced before it leaves: no environment values (only the names of the
variables, and the values of the flags the scaler reads), no host paths of the engine's own.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

MANAGED_LABEL = "autoscale.managed"
PROJECT_LABEL = "com.docker.compose.project"
STACK_LABEL = "com.docker.stack.namespace"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
# The warm pool's flag (scaler.backends.warm_pool.WARM_ENV, services.warm_start): the scaler reads
# it back from an inspected container, so its value is the one environment value shown.
WARM_ENV = "WORKER_WARM_START"
SHOWN_ENV_VALUES = frozenset({WARM_ENV})
# Host paths of the engine's own files: nothing the scaler reads, nothing a caller needs.
HIDDEN_CONTAINER_FIELDS = ("GraphDriver", "LogPath", "ResolvConfPath", "HostnamePath", "HostsPath")
NODE_FIELDS = ("ID", "Description.Hostname", "Status.State", "Spec.Availability", "ManagerStatus")


class BadInput(ValueError):
    """A caller's input the gate does not read (answered 400 with this message)."""


@dataclass(frozen=True)
class Scope:
    """The label that bounds the gate: its Compose project, or its Swarm stack."""

    key: str  # PROJECT_LABEL or STACK_LABEL
    value: str

    @property
    def kind(self) -> str:
        return "project" if self.key == PROJECT_LABEL else "stack"

    def labels(self) -> list[str]:
        """The label filters every listing gets (the engine ANDs label filters)."""
        return [f"{MANAGED_LABEL}=true", f"{self.key}={self.value}"]

    def holds(self, labels: dict[str, Any] | None) -> bool:
        labels = labels or {}
        return (
            labels.get(MANAGED_LABEL) == "true"
            and labels.get(self.key) == self.value
            and labels.get(ONEOFF_LABEL, "False") == "False"
        )

    def __str__(self) -> str:
        return f"{self.kind} {self.value!r}"


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise BadInput(f"duplicate JSON key {next(k for k in keys if keys.count(k) > 1)!r}")
    bad = [k for k in keys if not k.isascii()]
    if bad:
        raise BadInput(f"non-ASCII JSON key {bad[0]!r}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise BadInput(f"{name} is not JSON")


def strict_json(data: bytes | str) -> Any:
    """JSON parsed as the gate reads it: UTF-8, no duplicate or non-ASCII keys, no NaN."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8: {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise BadInput(f"not JSON: {exc}") from exc
    except RecursionError:  # "[[[[...": a 4 KiB body or a filter nests deeper than json reads
        raise BadInput("not JSON the gate reads: nested too deeply") from None


def parse_filters(raw: str | None, keys: frozenset[str] | None = None) -> dict[str, list[str]]:
    """A Docker ``filters`` parameter (``{"k": ["v"]}`` or the older ``{"k": {"v": true}}``),
    with only the filter ``keys`` given (None: any)."""
    if raw is None or raw == "":
        return {}
    parsed = strict_json(raw)
    if not isinstance(parsed, dict):
        raise BadInput("filters: expected a JSON object")
    filters: dict[str, list[str]] = {}
    for key, value in parsed.items():
        if keys is not None and key not in keys:
            raise BadInput(f"filters: {key!r} is not read (only {sorted(keys)})")
        listed = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if listed or (isinstance(value, dict) and all(v is True for v in value.values())):
            values = [str(v) for v in value]
        else:
            raise BadInput(f"filters: {key!r}: expected a list of strings")
        if not all(v.isascii() for v in values):
            raise BadInput(f"filters: {key!r}: non-ASCII value")
        filters[key] = values
    return filters


def narrowed(filters: dict[str, list[str]], scope: Scope, **fixed: list[str]) -> str:
    """The caller's filters with the scope's labels added and ``fixed`` keys set: JSON."""
    out = {k: list(v) for k, v in filters.items()}
    out["label"] = [*out.get("label", []), *scope.labels()]
    out.update(fixed)
    return json.dumps(out, sort_keys=True)


def boolean(value: str) -> bool:
    """A query flag as the engine reads one (``httputils.BoolValue``)."""
    return value.strip().lower() not in ("", "0", "no", "false", "none")


def integer(name: str, value: str, low: int, high: int) -> int:
    if not value.strip().lstrip("-").isdigit() or not value.isascii():
        raise BadInput(f"{name}={value!r}: expected an integer")
    number = int(value)
    if not low <= number <= high:
        raise BadInput(f"{name}={number}: expected {low}..{high}")
    return number


def env_names(env: list[str] | None) -> list[str]:
    """An environment with its values removed: ``NAME`` only, but for SHOWN_ENV_VALUES."""
    out: list[str] = []
    for entry in env or []:
        name, sep, _ = str(entry).partition("=")
        out.append(str(entry) if sep and name in SHOWN_ENV_VALUES else name)
    return out


def sanitise_container(inspected: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(inspected)
    for key in HIDDEN_CONTAINER_FIELDS:
        out.pop(key, None)
    config = out.get("Config")
    if isinstance(config, dict) and "Env" in config:
        config["Env"] = env_names(config["Env"])
    return out


def _hide_container_spec_env(spec: Any) -> None:
    if isinstance(spec, dict) and "Env" in spec:
        spec["Env"] = env_names(spec["Env"])


def sanitise_service(row: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(row)
    for key in ("Spec", "PreviousSpec"):
        template = (out.get(key) or {}).get("TaskTemplate") or {}
        _hide_container_spec_env(template.get("ContainerSpec"))
    return out


def sanitise_task(row: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(row)
    _hide_container_spec_env((out.get("Spec") or {}).get("ContainerSpec"))
    return out


def reduce_node(row: dict[str, Any]) -> dict[str, Any]:
    """A swarm node reduced to the fields the scaler reads (NODE_FIELDS)."""
    out: dict[str, Any] = {}
    for dotted in NODE_FIELDS:
        source: Any = row
        for part in dotted.split("."):
            source = source.get(part) if isinstance(source, dict) else None
        if source is None:
            continue
        target = out
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = copy.deepcopy(source)
    return out


def version_view(engine: dict[str, Any], api_version: str) -> dict[str, Any]:
    """The engine's version, with the API version the gate speaks (its only version)."""
    out: dict[str, Any] = {
        k: engine[k] for k in ("Version", "GoVersion", "Os", "Arch") if k in engine
    }
    out["ApiVersion"] = api_version
    out["MinAPIVersion"] = api_version
    return out


def info_view(engine: dict[str, Any]) -> dict[str, Any]:
    swarm = engine.get("Swarm") or {}
    keys = ("LocalNodeState", "ControlAvailable", "NodeID")
    return {"Swarm": {k: swarm[k] for k in keys if k in swarm}}


def event_kept(event: dict[str, Any], scope: Scope) -> bool:
    """An engine event the caller may see: a managed container's, not an exec's (whose action
    names the command run)."""
    if event.get("Type") != "container":
        return False
    action = str(event.get("Action") or event.get("status") or "")
    if action.startswith("exec_"):
        return False
    return scope.holds((event.get("Actor") or {}).get("Attributes"))
