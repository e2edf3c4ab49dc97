"""A new replica of a managed Compose service, composed by the gate from one of its replicas.

The caller names only the service, the number and whether the replica is for the warm pool. The
template is a managed container of that service in the gate's project (the lowest-numbered live
one, else the lowest-numbered); one that reaches the host is refused, naming each setting
(``template_safety``, and ``more_problems``: unmasked paths, a shared cgroup, volume driver
options, a named volume that is a host path). The clone is the template's inspected
configuration with only the name ``{project}-{service}-{number}``, the container-number label,
the hostname (Docker's default, the id, is left to the clone's own) and the warm flag changed;
the image by its name while that still means the template's image, else by id; each network
with the aliases Compose gives (name and service), the first at creation (API 1.41 takes one)
and the others connected before anything starts it. It is created, not started: starting is the
caller's next call. With ``replaces`` (the id of the stopped or dead container holding the
number) that container is removed once the clone is composed, so a service's only container can
be replaced under its own number. This is what scaler/backends/compose.py's ``_clone`` and
``_image_for`` did through the general API.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scaler.backends.template_safety import unsafe_settings
from scaler.gate.engine import Engine, EngineError, message_of, segment
from scaler.gate.rules import NUMBER_LABEL, SERVICE_LABEL, WARM_ENV, Scope

log = logging.getLogger(__name__)

LIVE_STATES = ("running", "restarting", "paused")


class ReplicaRequest(BaseModel):
    """``POST /gate/v1/replicas``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    service: str = Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
    number: int = Field(ge=1, le=999)
    warm: bool = False
    # The id of the service's container that now holds ``number``, not running (dead, or
    # stopped by the caller): removed once the clone's configuration is composed, so that the
    # clone takes its number even when it was the service's only container (its template).
    replaces: str | None = Field(default=None, pattern=r"^[0-9a-f]{12,64}$")


async def more_problems(engine: Engine, template: dict[str, Any]) -> list[str]:
    """What else reaches the host, beyond ``template_safety`` (the old proxy refused these in any
    create): unmasked /proc and /sys paths, another container's or the host's cgroup, volume
    driver options, and named volumes that are a host path in disguise (the local driver with a
    ``device``) or of another driver."""
    host = template.get("HostConfig") or {}
    problems: list[str] = []
    for key in ("MaskedPaths", "ReadonlyPaths"):
        if host.get(key) == []:
            problems.append(f"HostConfig.{key} is empty (/proc and /sys unmasked)")
    cgroup = str(host.get("Cgroup") or "")
    if cgroup == "host" or cgroup.startswith("container:"):
        problems.append(f"HostConfig.Cgroup is {cgroup!r} (not the container's own)")
    if host.get("Capabilities"):
        problems.append(f"HostConfig.Capabilities sets {host['Capabilities']!r}")
    if host.get("VolumeDriver"):
        problems.append(f"HostConfig.VolumeDriver is {host['VolumeDriver']!r}")
    for mount in host.get("Mounts") or []:
        if (mount.get("VolumeOptions") or {}).get("DriverConfig"):
            problems.append(f"the mount at {mount.get('Target')!r} has volume driver options")
    for mount in template.get("Mounts") or []:
        if mount.get("Type") != "volume" or not mount.get("Name"):
            continue
        try:
            volume = await engine.json("GET", f"/volumes/{segment(str(mount['Name']))}")
        except EngineError as exc:
            problems.append(f"volume {mount['Name']!r} could not be read: {exc.message}")
            continue
        driver, options = volume.get("Driver"), volume.get("Options") or {}
        disguised = "device" in options and options.get("type") != "tmpfs"
        if driver != "local" or disguised:
            problems.append(
                f"volume {mount['Name']!r} (at {mount.get('Destination')!r}) is of driver "
                f"{driver!r} with options {options!r} (a host path or another store)"
            )
    return problems


class CloneRefused(Exception):
    """The request cannot be met: ``status`` (403 unsafe, 404 no template, 409 name taken)."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def pick_template(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The listing row to clone: the lowest-numbered live replica, else the lowest-numbered."""

    def number(row: dict[str, Any]) -> int:
        value = str((row.get("Labels") or {}).get(NUMBER_LABEL) or "")
        return int(value) if value.isdigit() else 1_000_000

    ordered = sorted(rows, key=lambda r: (r.get("State") not in LIVE_STATES, number(r)))
    return ordered[0] if ordered else None


def compose_clone(
    template: dict[str, Any], *, name: str, service: str, number: int, warm: bool, image: str
) -> tuple[dict[str, Any], str, dict[str, list[str]]]:
    """The create body, the network it names, and the other networks with their aliases."""
    config = dict(template["Config"])
    env = [e for e in config.get("Env") or [] if not str(e).startswith(f"{WARM_ENV}=")]
    config["Env"] = [*env, f"{WARM_ENV}=1"] if warm else env
    labels = dict(config.get("Labels") or {})
    labels[NUMBER_LABEL] = str(number)
    config["Labels"] = labels
    if config.get("Hostname") == template["Id"][:12]:
        config.pop("Hostname")  # Docker's default (the id): the clone gets its own
    config["Image"] = image
    networks: dict[str, Any] = (template.get("NetworkSettings") or {}).get("Networks") or {}
    host_config = dict(template["HostConfig"])
    primary = str(host_config.get("NetworkMode", ""))
    if primary not in networks and networks:
        primary = next(iter(networks))
    aliases = [name, service]
    source = networks.get(primary) or {}
    # Compose's aliases; no static addresses (they would clash with the template's).
    endpoint = {
        "Aliases": aliases,
        "Links": source.get("Links"),
        "DriverOpts": source.get("DriverOpts"),
    }
    config["HostConfig"] = host_config
    config["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoint}}
    # As docker-py's create: top-level nulls are left out. StopTimeout travels with Config.
    body = {k: v for k, v in config.items() if v is not None}
    others = {network: list(aliases) for network in networks if network != primary}
    return body, primary, others


async def image_for(engine: Engine, template: dict[str, Any]) -> str:
    """The image by its name when that still means the template's image, else by its id."""
    image_id = str(template.get("Image", ""))
    image_name = str((template.get("Config") or {}).get("Image", ""))
    if not image_name:
        return image_id
    try:
        current = await engine.json("GET", f"/images/{segment(image_name)}/json")
    except EngineError:
        return image_id or image_name
    return image_name if (current or {}).get("Id") == image_id else image_id


async def remove_replaced(engine: Engine, scope: Scope, request: ReplicaRequest) -> None:
    """Remove the container ``request.replaces``: a managed container of the same service in the
    scope, numbered ``request.number``, not running (else 404 or 409, nothing removed)."""
    ref = str(request.replaces)
    try:
        old = await engine.json("GET", f"/containers/{segment(ref)}/json")
    except EngineError as exc:
        if exc.status != 404:
            raise
        old = {}
    labels = (old.get("Config") or {}).get("Labels") or {}
    if (
        not scope.holds(labels)
        or labels.get(SERVICE_LABEL) != request.service
        or not str(old.get("Id", "")).startswith(ref)
    ):
        raise CloneRefused(
            404,
            f"gate: no managed container {ref!r} of service {request.service!r} in {scope}",
            kind="not-managed" if old else None,
        )
    if labels.get(NUMBER_LABEL) != str(request.number):
        raise CloneRefused(
            409,
            f"gate: container {ref[:12]} is number {labels.get(NUMBER_LABEL)!r}, "
            f"not {request.number}: a clone replaces only the container of its number",
        )
    state = old.get("State") or {}
    if state.get("Running") or state.get("Restarting"):
        raise CloneRefused(
            409, f"gate: container {ref[:12]} is running: stop it before it is replaced"
        )
    status, data = await engine.call("DELETE", f"/containers/{segment(str(old['Id']))}")
    if status >= 400 and status != 404:
        raise EngineError(status, message_of(data))


async def create_replica(
    engine: Engine, scope: Scope, request: ReplicaRequest, allowed_bind_mounts: list[str]
) -> dict[str, str]:
    """Create (not start) replica ``request.number`` of ``request.service``: {"Id", "Name"}."""
    service = request.service
    filters = {"label": [*scope.labels(), f"{SERVICE_LABEL}={service}"]}
    rows = await engine.json(
        "GET", "/containers/json", {"all": "1", "filters": json.dumps(filters)}
    )
    rows = [
        r
        for r in rows or []
        if scope.holds(r.get("Labels")) and (r.get("Labels") or {}).get(SERVICE_LABEL) == service
    ]
    row = pick_template(rows)
    if row is None:
        raise CloneRefused(
            404,
            f"gate: service {service!r} has no container in {scope} labelled "
            "autoscale.managed=true to clone: start it once with `docker compose up`",
        )
    template = await engine.json("GET", f"/containers/{segment(str(row['Id']))}/json")
    labels = (template.get("Config") or {}).get("Labels") or {}
    if not scope.holds(labels) or labels.get(SERVICE_LABEL) != service:
        raise CloneRefused(409, f"gate: the template of {service!r} changed while read; retry")
    template_name = str(template.get("Name", "?")).lstrip("/")
    problems = unsafe_settings(template, allowed_bind_mounts) + await more_problems(
        engine, template
    )
    if problems:
        raise CloneRefused(
            403,
            f"gate: refusing to clone {template_name} (service {service!r}): "
            f"{'; '.join(problems)}; fix the service's definition (docs/security.md)",
            kind="unsafe-template",
        )
    name = f"{scope.value}-{service}-{request.number}"
    image = await image_for(engine, template)
    body, _, others = compose_clone(
        template, name=name, service=service, number=request.number, warm=request.warm, image=image
    )
    if request.replaces is not None:
        await remove_replaced(engine, scope, request)
    status, data = await engine.call("POST", "/containers/create", {"name": name}, body)
    if status == 409:
        raise CloneRefused(409, f"gate: the container name {name!r} is already taken")
    if status >= 400:
        raise EngineError(status, message_of(data))
    cid = str(json.loads(data)["Id"])
    try:
        for network, aliases in others.items():
            await engine.json(
                "POST",
                f"/networks/{segment(network)}/connect",
                body={"Container": cid, "EndpointConfig": {"Aliases": aliases}},
            )
    except EngineError:
        # Leave no half-made container behind (created, never started: it races nobody).
        try:
            await engine.call("DELETE", f"/containers/{segment(cid)}", {"force": "1"})
        except EngineError:
            log.warning("could not remove the failed clone %s", name)
        raise
    log.info("created %s%s (clone of %s)", "warm " if request.warm else "", name, template_name)
    return {"Id": cid, "Name": name}
