"""A count change by the Swarm backend changes the count and nothing else (issue 24).

The stack is deployed by the host's docker CLI (28.x) against the nodes' engines (20.10), as a
user's workstation does: such a CLI sends no ``ContainerSpec.DNSConfig``, and a spec read back
with the engine's defaults (docker-py's ``fetch_current_spec``) gains ``DNSConfig: {}``, a new
task template, so Swarm rolled the running tasks on the scaler's first count change. Here the
backend raises the count of a start-first service with a slow health check, and the spec read
back must equal the one before except the count, with the original task still running in its
slot and no replacement started. Then the old call (docker-py's ``fetch_current_spec=True``) is
made on purpose, and the backend's check must report the rolling update it starts.

The backend reaches the engine through the engine gate (scaler/gate, tests/swarm/stack_gate.py),
as in the deployed stack: it sends no spec, the gate's scale operation posts the spec as stored
with only the count changed. A second test shows, against the same real engine, what the gate
refuses to a caller with its token: a service of another stack or an unmanaged one, and the
engine's own service update with a spec.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import pytest
from celery import Celery
from cluster import NODES, SwarmCluster, docker_cli
from stack_gate import stack_gate

from scaler.backends.base import ServiceSpec
from scaler.backends.swarm import MANAGED_LABEL, STACK_LABEL, SwarmBackend
from tests.gate.gate_support import post_json, request

if TYPE_CHECKING:
    from conftest import SwarmImages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.docker]

# start-first, as the stack's workers; a health check whose first probe comes after 10 s keeps a
# replacement "starting" (Swarm waits for health) long past the backend's 5 s check.
STACK = """\
version: "3.8"
services:
  w:
    image: {image}
    entrypoint: ["sleep", "infinity"]
    init: true
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "true"]
      interval: 10s
    deploy:
      replicas: 1
      labels:
        autoscale.managed: "true"
      update_config:
        order: start-first
      restart_policy:
        condition: on-failure
  u:
    image: {image}
    entrypoint: ["sleep", "infinity"]
    deploy:
      replicas: 0
"""


@pytest.fixture
def stack(swarm_cluster: SwarmCluster, swarm_images: SwarmImages, tmp_path: Path) -> Iterator[str]:
    """A one-service stack deployed by the host's CLI on node-1; removed afterwards."""
    name = f"cc{uuid.uuid4().hex[:6]}"
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(STACK.format(image=swarm_images.app))
    versions = docker_cli("version", "--format", "{{.Client.Version}} {{.Server.Version}}",
                          env=swarm_cluster.docker_env()).stdout.split()  # fmt: skip
    print(f"stack {name} deployed by docker CLI {versions[0]} on engine {versions[1]}")
    swarm_cluster.deploy_stack(stack_file, name)
    try:
        yield name
    finally:
        swarm_cluster.remove_stack(name)


def raw(client: docker.DockerClient, service: str, defaults: bool = False) -> dict[str, Any]:
    """The service as the engine returns it (with the engine's defaults inserted if asked)."""
    return client.api.inspect_service(service, insert_defaults=True if defaults else None)


def but_count(spec: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    out["Mode"]["Replicated"]["Replicas"] = None
    return out


def tasks(client: docker.DockerClient, service: str) -> list[dict[str, Any]]:
    return client.api.tasks(filters={"service": service})


def running(client: docker.DockerClient, service: str) -> list[dict[str, Any]]:
    return [t for t in tasks(client, service)
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]  # fmt: skip


def test_a_count_change_changes_only_the_count(swarm_cluster: SwarmCluster, stack: str) -> None:
    client = swarm_cluster.manager_client()
    service = f"{stack}_w"
    (original,) = wait_until("the original task running (healthy)",
                             lambda: running(client, service), 120, 0.5)  # fmt: skip
    before = raw(client, service)
    # The case of issue 24: what the CLI sent lacks what the engine's defaults would add.
    container = before["Spec"]["TaskTemplate"]["ContainerSpec"]
    defaulted = raw(client, service, defaults=True)["Spec"]["TaskTemplate"]["ContainerSpec"]
    assert "DNSConfig" not in container and "DNSConfig" in defaulted, json.dumps(container)

    # Through the engine gate, as in the stack: the backend sends no spec of its own.
    gate = stack_gate(swarm_cluster, stack, NODES[0]).__enter__()
    backend = SwarmBackend(stack, Celery(set_as_current=False), poll_s=0.2,
                           client_factory=gate.clients())  # fmt: skip
    backend.manage([ServiceSpec("w", ("q",))])
    try:
        result = backend.scale("w", 3)
        assert (result.before, result.after) == (1, 3)
        after = raw(client, service)
        assert after["Spec"]["Mode"]["Replicated"]["Replicas"] == 3
        assert after["Version"]["Index"] > before["Version"]["Index"]
        assert but_count(after["Spec"]) == but_count(before["Spec"]), json.dumps(
            {"before": before["Spec"], "after": after["Spec"]}
        )
        # Three tasks running (their health checks passed): the new ones in new slots, and the
        # original still in its own, never replaced (a rolling update would start a second task
        # in its slot first: start-first).
        wait_until("three tasks running", lambda: len(running(client, service)) == 3, 120, 0.5)
        in_slot = [t for t in tasks(client, service) if t["Slot"] == original["Slot"]]
        assert [t["ID"] for t in in_slot] == [original["ID"]], in_slot
        assert in_slot[0]["DesiredState"] == "running"
        assert (raw(client, service).get("UpdateStatus") or {}).get("State") != "updating"
        # The backend's own check (a thread of scale(), 5 s at most) found nothing to report.
        wait_until("the backend's check ended", lambda: not [
            th for th in threading.enumerate() if th.name == "check-w"], 30, 0.2)  # fmt: skip
        events = backend._events
        assert "swarm-removed-another" not in [e.kind for e in events], events

        # The old call, made on purpose: docker-py's fetch_current_spec reads the spec with the
        # engine's defaults, a new task template (DNSConfig {}), and Swarm rolls the tasks.
        keep = {t["ID"]: t.get("NodeID", "") for t in running(client, service)}
        now = raw(client, service)
        client.api.update_service(
            service, now["Version"]["Index"], fetch_current_spec=True,
            mode=docker.types.ServiceMode("replicated", replicas=3),
        )  # fmt: skip
        t0 = time.monotonic()
        reported = backend._stopped_others("w", keep, "a defaulted update")
        print(f"rolling update reported after {time.monotonic() - t0:.1f} s: {sorted(reported)}")
        # Parallelism 1: Swarm replaces one task at a time; the first is reported at once.
        assert reported and reported <= set(keep), (reported, keep)
        events = [e for e in backend._events if e.kind == "swarm-removed-another"]
        assert events and "rolling update" in events[-1].detail, events
    finally:
        backend.close()
        gate.__exit__(None, None, None)


def test_the_gate_scales_only_its_stacks_managed_services_and_only_their_count(
    swarm_cluster: SwarmCluster, swarm_images: SwarmImages, stack: str
) -> None:
    """From where a scaler stands (any caller with the token), against the real engine: the gate
    lists only the stack's managed service; a scale of another stack's managed service or of the
    stack's unmanaged one is 404 and changes nothing; the engine's own service update with a spec
    is 403 (not an operation); a scale changes ``Mode.Replicated.Replicas`` and nothing else, and
    a stale version is 409."""
    client = swarm_cluster.manager_client()
    service = f"{stack}_w"
    other = f"ot{stack[2:]}"
    foreign = client.services.create(
        swarm_images.app, ["sleep", "infinity"], name=f"{other}_w",
        labels={STACK_LABEL: other, MANAGED_LABEL: "true"},
        mode=docker.types.ServiceMode("replicated", replicas=0),
    )  # fmt: skip
    try:
        with stack_gate(swarm_cluster, stack, NODES[0]) as gate:
            listed = request(gate.port, "GET", "/v1.41/services")
            assert listed.status == 200, listed.body
            assert [s["Spec"]["Name"] for s in listed.json()] == [service]

            untouched = {name: raw(client, name) for name in (f"{other}_w", f"{stack}_u")}
            for name, before in untouched.items():
                wanted = {"replicas": 2, "version": before["Version"]["Index"]}
                for ref in (name, before["ID"]):
                    answer = post_json(gate.port, f"/gate/v1/services/{ref}/scale", wanted)
                    assert answer.status == 404, (ref, answer.status, answer.body)
                    assert f"no managed service {ref!r}" in answer.message, answer.message
                assert raw(client, name)["Version"] == before["Version"], name

            before = raw(client, service)
            version = before["Version"]["Index"]
            spec = copy.deepcopy(before["Spec"])
            spec["Mode"]["Replicated"]["Replicas"] = 2
            spec["TaskTemplate"]["ContainerSpec"]["Privileges"] = {"NoNewPrivileges": False}
            for path in (f"/v1.41/services/{before['ID']}/update?version={version}",
                         f"/services/{service}/update?version={version}"):  # fmt: skip
                answer = request(gate.port, "POST", path, json.dumps(spec).encode())
                assert answer.status == 403, (path, answer.status, answer.body)
                assert "is not an operation of the gate" in answer.message, answer.message
            assert raw(client, service)["Version"]["Index"] == version

            answer = post_json(gate.port, f"/gate/v1/services/{service}/scale",
                               {"replicas": 2, "version": version})  # fmt: skip
            assert answer.status == 200, answer.body
            after = raw(client, service)
            assert after["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
            assert after["Version"]["Index"] > version
            assert but_count(after["Spec"]) == but_count(before["Spec"]), json.dumps(
                {"before": before["Spec"], "after": after["Spec"]}
            )
            stale = post_json(gate.port, f"/gate/v1/services/{before['ID']}/scale",
                              {"replicas": 5, "version": version})  # fmt: skip
            assert stale.status == 409 and f"not {version}" in stale.message, stale.body
            assert raw(client, service)["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
            refused = request(gate.port, "GET", "/gate/v1/status").json()["refused"]
            assert refused.get("not-managed", 0) >= 4 and refused.get("not-an-operation") == 2
    finally:
        foreign.remove()
