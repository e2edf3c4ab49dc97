"""The engine gate (scaler/gate) for a stack of the test swarm, served from the test process.

As compose/stack.yaml runs one per manager for the scalers, here one gate in a thread on the host
fronts a node's engine (tcp://<node ip>:2375, the way the tests reach the nodes) with the stack's
scope (GATE_STACK): the Swarm backend under test reaches the engine only through it.
"""

from __future__ import annotations

from cluster import ENGINE_PORT, NODES, SwarmCluster

from scaler.gate.app import Settings
from scaler.gate.rules import STACK_LABEL, Scope
from tests.gate.gate_support import TOKEN, GateServer

__all__ = ["TOKEN", "GateServer", "stack_gate"]


def stack_gate(cluster: SwarmCluster, stack: str, node: str = NODES[0]) -> GateServer:
    """A gate for ``stack`` on ``node``'s engine, not started yet: ``with stack_gate(...) as g``;
    ``g.clients()`` makes the backend's engine clients (the gate's version and token)."""
    settings = Settings(
        scope=Scope(STACK_LABEL, stack),
        token=TOKEN,
        docker_host=f"tcp://{cluster.node_ip(node)}:{ENGINE_PORT}",
    )
    return GateServer(settings)
