"""The gate against the real engine, with a world of its own per test module.

A unique Compose project ``gt-<id>`` holds a managed template of service ``worker-x`` (running,
with a secret in its environment, two networks, a named volume and the hardening the stack's
workers have), an unmanaged look-alike of the same service, a one-off, and a managed container of
another project. Everything carries the label ``gate-test=<id>`` (clones inherit it) and is
removed at the end of the module, whatever happened.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gate_support import GateServer
from gate_world import TEST_LABEL, World, cleanup, engine_or_skip, settings_for

from scaler.gate.rules import (
    STACK_LABEL,
    Scope,
)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    client = engine_or_skip()
    uid = uuid.uuid4().hex[:10]
    project = f"gt-{uid}"
    try:
        nets = []
        for suffix in ("a", "b"):
            net = client.api.create_network(f"{project}_{suffix}", labels={TEST_LABEL: uid})
            nets.append(f"{project}_{suffix}")
            assert net["Id"]
        volume = f"{project}_data"
        client.api.create_volume(volume, labels={TEST_LABEL: uid})
        w = World(uid, project, f"gt-{uid}-other", client, nets, volume)
        w.template = f"{project}-worker-x-1"
        w.create(w.template, w.labels("worker-x", 1), **w.hardened())
        w.lookalike = f"{project}-worker-x-98"
        w.create(w.lookalike, w.labels("worker-x", 98, managed=False))
        w.oneoff = f"{project}-worker-x-run-1"
        w.create(w.oneoff, w.labels("worker-x", 1, oneoff=True))
        w.other = f"{w.other_project}-worker-x-1"
        w.create(w.other, w.labels("worker-x", 1, project=w.other_project))
        yield w
    finally:
        cleanup(client, uid)
        client.close()


@pytest.fixture(scope="module")
def gate(world: World) -> Iterator[GateServer]:
    with GateServer(settings_for(world)) as server:
        yield server


@pytest.fixture(scope="module")
def swarm_gate(world: World) -> Iterator[GateServer]:
    """A gate for a Swarm stack, on this (non-swarm) engine."""
    with GateServer(settings_for(world, scope=Scope(STACK_LABEL, world.project))) as server:
        yield server


@pytest.fixture
def managed(world: World) -> Callable[..., str]:
    """Make a managed container of service ``worker-m`` (its name), started unless told."""
    counter = iter(range(100, 1000))

    def make(**kwargs: Any) -> str:
        number = next(counter)
        name = f"{world.project}-worker-m-{number}-{uuid.uuid4().hex[:4]}"
        world.create(name, world.labels("worker-m", number), **kwargs)
        return name

    return make
