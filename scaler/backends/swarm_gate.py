"""The Swarm backend's two operations of the engine gate's own (docs/gate.md): a count change and
the stack the gate serves.

The gate is the only holder of a manager's socket (compose/stack.yaml's ``gate`` service): the
scaler reads services, tasks and nodes through it as through the engine's API, but changes a
count only with ``POST /gate/v1/services/{id}/scale`` (``{"replicas": N, "version": V}``). The
gate reads the spec as stored and posts it back with only ``Mode.Replicated.Replicas`` changed,
at version V: no spec written by the scaler reaches the engine. A V the service has moved past
is 409; the caller reads again.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.errors

from scaler.backends.engine import ClientFactory, gate_call, gate_scope

STACK_LABEL = "com.docker.stack.namespace"


class StaleVersion(Exception):
    """The gate's 409: the service changed since the version the caller read."""


def scale_service(
    client: docker.DockerClient, service_id: str, replicas: int, version: int
) -> dict[str, Any]:
    """``POST /gate/v1/services/{id}/scale``: the engine's answer to the update the gate composed.
    Raises StaleVersion on the gate's 409, docker's APIError on any other refusal."""
    body = {"replicas": replicas, "version": version}
    try:
        return dict(gate_call(client, "POST", f"/gate/v1/services/{service_id}/scale", body) or {})
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise StaleVersion(str(exc.explanation or exc)) from None
        raise


def gate_stack(client_factory: ClientFactory | None = None) -> str:
    """The Swarm stack the engine gate serves (GATE_STACK): the scaler's own task is not a
    managed one, so it cannot read its own labels, and it cannot disagree with the gate."""
    return gate_scope(STACK_LABEL, "Swarm stack", client_factory)
