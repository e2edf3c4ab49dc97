"""The gate tests' world: a unique Compose project of the test's own on the real engine, and
the gate's settings for it (tests/gate/conftest.py makes the fixtures; the tests import from
here, never from ``conftest``, which names another module in each test directory)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import pytest
from gate_support import SECRET, TOKEN

from scaler.gate.app import Settings
from scaler.gate.rules import (
    MANAGED_LABEL,
    NUMBER_LABEL,
    ONEOFF_LABEL,
    PROJECT_LABEL,
    SERVICE_LABEL,
    Scope,
)

IMAGE = "local/python:3.11"
TEST_LABEL = "gate-test"


@dataclass
class World:
    uid: str
    project: str
    other_project: str
    client: docker.DockerClient
    networks: list[str]
    volume: str
    template: str = ""  # container names
    lookalike: str = ""
    other: str = ""
    oneoff: str = ""
    made: list[str] = field(default_factory=list)

    def labels(
        self,
        service: str,
        number: int,
        *,
        managed: bool = True,
        project: str | None = None,
        oneoff: bool = False,
    ) -> dict[str, str]:
        return {
            TEST_LABEL: self.uid,
            MANAGED_LABEL: "true" if managed else "false",
            PROJECT_LABEL: project or self.project,
            SERVICE_LABEL: service,
            NUMBER_LABEL: str(number),
            ONEOFF_LABEL: "True" if oneoff else "False",
        }

    def create(
        self,
        name: str,
        labels: dict[str, str],
        *,
        start: bool = True,
        command: list[str] | None = None,
        init: bool = True,
        stop_timeout: int = 7,
        networks: list[str] | None = None,
        raw_host: dict[str, Any] | None = None,
        **host: Any,
    ) -> str:
        """A container made through the socket (not the gate); its id."""
        api = self.client.api
        nets = self.networks if networks is None else networks
        host_config = api.create_host_config(init=init, **host)
        host_config.update(raw_host or {})
        networking = None
        if nets and host.get("network_mode") is None:
            host_config["NetworkMode"] = nets[0]
            networking = api.create_networking_config(
                {nets[0]: api.create_endpoint_config(aliases=[labels[SERVICE_LABEL]])}
            )
        created = api.create_container(
            IMAGE,
            command=command or ["sleep", "infinity"],
            name=name,
            labels=labels,
            environment=[f"SECRET_TOKEN={SECRET}", "PLAIN_SETTING=1"],
            stop_signal="SIGTERM",
            stop_timeout=stop_timeout,
            host_config=host_config,
            networking_config=networking,
            healthcheck={"Test": ["CMD", "true"], "Interval": 30_000_000_000},
            working_dir="/tmp",
        )
        cid = str(created["Id"])
        self.made.append(cid)
        if host.get("network_mode") is None:
            for net in nets[1:]:
                api.connect_container_to_network(cid, net, aliases=[labels[SERVICE_LABEL]])
        if start:
            api.start(cid)
        return cid

    def hardened(self) -> dict[str, Any]:
        """The stack's worker hardening (compose/compose.yaml's x-hardening)."""
        return {
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "read_only": True,
            "tmpfs": {"/tmp": "size=16m"},
            "pids_limit": 64,
            "mem_limit": "128m",
            "restart_policy": {"Name": "unless-stopped"},
            "log_config": {"Type": "json-file", "Config": {"max-size": "1m"}},
            "binds": {self.volume: {"bind": "/data", "mode": "rw"}},
        }

    def inspect(self, ref: str) -> dict[str, Any]:
        return dict(self.client.api.inspect_container(ref))

    def exists(self, ref: str) -> bool:
        try:
            self.client.api.inspect_container(ref)
        except docker.errors.NotFound:
            return False
        return True

    def running(self, ref: str) -> bool:
        return bool(self.inspect(ref)["State"]["Running"])

    def names(self) -> set[str]:
        """The names of every container of this world (the engine's view)."""
        rows = self.client.api.containers(all=True, filters={"label": f"{TEST_LABEL}={self.uid}"})
        return {str(r["Names"][0]).lstrip("/") for r in rows}


def clone_differences(template: dict[str, Any], clone: dict[str, Any]) -> list[str]:
    """How an inspected clone's configuration differs from its inspected template's, beyond
    what the gate changes: its name, its number label, the hostname (Docker's default: the id)
    and the warm flag (``WORKER_WARM_START=1``); [] for a true clone."""
    out: list[str] = []
    for key in sorted(set(template["HostConfig"]) | set(clone["HostConfig"])):
        if template["HostConfig"].get(key) != clone["HostConfig"].get(key):
            out.append(f"HostConfig.{key}")
    for key in sorted(set(template["Config"]) | set(clone["Config"])):
        theirs, ours = template["Config"].get(key), clone["Config"].get(key)
        if key == "Hostname":
            if ours == clone["Id"][:12] and theirs == template["Id"][:12]:
                ours = theirs
        elif key == "Labels":
            ours = {**(ours or {}), NUMBER_LABEL: (theirs or {}).get(NUMBER_LABEL)}
        elif key == "Env":
            ours = [e for e in ours or [] if e != "WORKER_WARM_START=1"]
            theirs = [e for e in theirs or [] if not e.startswith("WORKER_WARM_START=")]
        if theirs != ours:
            out.append(f"Config.{key}")
    if template["Image"] != clone["Image"]:
        out.append("Image")
    if [m.get("Name") for m in template["Mounts"]] != [m.get("Name") for m in clone["Mounts"]]:
        out.append("Mounts")
    if set(template["NetworkSettings"]["Networks"]) != set(clone["NetworkSettings"]["Networks"]):
        out.append("NetworkSettings.Networks")
    return out


def engine_or_skip() -> docker.DockerClient:
    """A client of this host's engine, which has the image the worlds' containers run; the test
    is skipped (saying what is missing) otherwise."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"needs a Docker engine: {exc}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        client.close()
        pytest.skip(f"needs the local image {IMAGE} (../shared/tools/build-base-images.sh)")
    return client


def cleanup(client: docker.DockerClient, uid: str) -> None:
    selector = {"label": f"{TEST_LABEL}={uid}"}
    for row in client.api.containers(all=True, filters=selector):
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_container(row["Id"], force=True, v=True)
    for net in client.api.networks(filters=selector):
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_network(net["Id"])
    for vol in (client.api.volumes(filters=selector) or {}).get("Volumes") or []:
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_volume(vol["Name"], force=True)


def settings_for(world: World, **changes: Any) -> Settings:
    values: dict[str, Any] = {"scope": Scope(PROJECT_LABEL, world.project), "token": TOKEN}
    values.update(changes)
    return Settings(**values)
