"""What makes a container unsafe to clone: settings that reach past the container to the host.

The Compose backend clones a service's replica from its inspected configuration, so whatever the
template has, every clone gets, started by the scaler on its own: a worker made privileged, given
capabilities or devices, put in a host namespace or handed a host directory (by mistake, or by
whoever could change or label a container) would be multiplied. The scaler refuses such a template
and names the container and each setting; bind mounts are allowed only from host paths the policy
lists (``clone.allowed_bind_mounts``). The engine gate (scaler/gate/clone.py) applies the same
rules, and more, to every clone it composes; the backend's check (per service, with the policy's
list) is what tells the operator why before the gate is asked, and keeps an unsafe parked replica
from being woken (a start the gate does not judge).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

# Namespaces whose "host" mode (or "container:<other>") leaves the container's isolation. Not
# CgroupnsMode: "host" is the engine's default on cgroup v1 hosts, every container has it there.
SHARED_NAMESPACES = ("PidMode", "IpcMode", "NetworkMode", "UTSMode", "UsernsMode")
UNCONFINED = ("unconfined", "label=disable", "label:disable")
# Host paths allowed for every service beside the policy's clone.allowed_bind_mounts: in the
# Compose stack, the directory of its secret files (compose/compose.yaml: every worker binds its
# /run/secrets files from there), which the stack knows and the policy file cannot.
EXTRA_BIND_MOUNTS_ENV = "SCALER_CLONE_ALLOWED_BIND_MOUNTS"


def extra_bind_mounts(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The comma-separated absolute host paths of SCALER_CLONE_ALLOWED_BIND_MOUNTS; ValueError
    naming an entry that is relative, has a '..' segment or is '/'."""
    raw = (os.environ if env is None else env).get(EXTRA_BIND_MOUNTS_ENV, "")
    paths = tuple(p.strip() for p in raw.split(",") if p.strip())
    for path in paths:
        if not path.startswith("/") or ".." in path.split("/") or path.strip("/") == "":
            raise ValueError(
                f"{EXTRA_BIND_MOUNTS_ENV}: {path!r} is invalid: expected absolute host paths "
                "other than '/', without '..', comma-separated"
            )
    return paths


def bind_sources(inspected: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container destination) of every bind mount of an inspected container."""
    found: list[tuple[str, str]] = []
    for mount in inspected.get("Mounts") or []:
        if mount.get("Type") == "bind":
            found.append((str(mount.get("Source", "")), str(mount.get("Destination", ""))))
    for bind in (inspected.get("HostConfig") or {}).get("Binds") or []:
        source, _, rest = str(bind).partition(":")
        if source.startswith("/"):  # else a named volume
            found.append((source, rest.split(":", 1)[0]))
    return list(dict.fromkeys(found))


def allowed(source: str, allowlist: Iterable[str]) -> bool:
    """Whether a host path is one of the allowed ones or inside one."""
    path = posixpath.normpath(source)
    for entry in allowlist:
        root = posixpath.normpath(entry)
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return True
    return False


def unsafe_settings(
    inspected: dict[str, Any], allowed_bind_mounts: Iterable[str] = ()
) -> list[str]:
    """Each setting of an inspected container that a clone must not copy, in words; [] if none."""
    host = inspected.get("HostConfig") or {}
    problems: list[str] = []
    if host.get("Privileged"):
        problems.append("HostConfig.Privileged is true")
    if host.get("CapAdd"):
        problems.append(f"HostConfig.CapAdd adds {list(host['CapAdd'])}")
    for key in ("Devices", "DeviceRequests", "DeviceCgroupRules"):
        if host.get(key):
            problems.append(f"HostConfig.{key} is {host[key]!r} (host devices)")
    for key in SHARED_NAMESPACES:
        mode = str(host.get(key) or "")
        if mode == "host" or mode.startswith("container:"):
            problems.append(f"HostConfig.{key} is {mode!r} (not the container's own namespace)")
    opts = [o for o in host.get("SecurityOpt") or [] if any(u in str(o) for u in UNCONFINED)]
    if opts:
        problems.append(f"HostConfig.SecurityOpt has {opts} (confinement turned off)")
    if host.get("VolumesFrom"):
        problems.append(f"HostConfig.VolumesFrom is {list(host['VolumesFrom'])}")
    allow = list(allowed_bind_mounts)
    for source, destination in bind_sources(inspected):
        if not allowed(source, allow):
            problems.append(
                f"bind mount of host path {source!r} (at {destination!r}) is not in the "
                f"policy's clone.allowed_bind_mounts {allow}"
            )
    return problems
