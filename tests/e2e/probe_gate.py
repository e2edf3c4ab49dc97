"""Run inside the scaler's container (stdin of `docker compose exec -T scaler python - ID NAME
OTHER`): what code running as the scaler can and cannot do through the engine gate.

Prints one JSON object: per attempt, "ok" or the HTTP status and the gate's message. ID is a
worker container of the project, NAME a container name the creates would use, OTHER a managed
container of another project. The client is the scaler's own (DOCKER_HOST=tcp://gate:2375 and
the gate's token from the scaler's environment); the raw requests go on its session.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

from scaler.backends.engine import default_client_factory

worker, name, other = sys.argv[1], sys.argv[2], sys.argv[3]
client = default_client_factory(timeout_s=20)()
api = client.api
image = api.inspect_container(worker)["Config"]["Image"]
own = socket.gethostname()  # the scaler's own container (Docker's default hostname: its id)


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        fn()
    except docker.errors.APIError as exc:
        return {"status": exc.status_code, "message": str(exc.explanation)}
    return {"status": "ok"}


def raw(method: str, path: str, body: Any = None, **headers: str) -> dict[str, Any]:
    """A request on the scaler's session (its token) that the SDK would not send."""
    response = api.request(
        method,
        f"{api.base_url}{path}",
        data=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json", **headers},
        timeout=20,
    )
    if response.status_code < 300:
        return {"status": "ok"}
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.text
    return {"status": response.status_code, "message": message}


def create(**host: Any) -> Callable[[], Any]:
    return lambda: api.create_container(
        image, "true", name=name, host_config=api.create_host_config(**host)
    )


def no_token() -> dict[str, Any]:
    bare = docker.APIClient(base_url=api.base_url, version="1.41", timeout=20)
    try:
        bare.ping()
    except docker.errors.APIError as exc:
        return {"status": exc.status_code, "message": str(exc.explanation)}
    return {"status": "ok"}


print(
    json.dumps(
        {
            "ping": attempt(api.ping),
            "list": attempt(lambda: api.containers(all=True)),
            "inspect": attempt(lambda: api.inspect_container(worker)),
            "no-token": no_token(),
            "exec": attempt(lambda: api.exec_create(worker, ["id"])),
            "pull": attempt(lambda: api.pull("busybox", tag="latest")),
            "volume": attempt(lambda: api.create_volume(name)),
            "privileged": attempt(create(privileged=True)),
            "host-root": attempt(create(binds=["/:/host"])),
            "host-pid": attempt(create(pid_mode="host")),
            "other-project-stop": attempt(lambda: api.stop(other, timeout=0)),
            "other-project-inspect": attempt(lambda: api.inspect_container(other)),
            "own-container-stop": attempt(lambda: api.stop(own, timeout=0)),
            "old-api-version": raw("GET", "/v1.24/containers/json"),
            "versioned-replicas": raw(
                "POST", "/v1.41/gate/v1/replicas", {"service": "worker-default", "number": 90}
            ),
            "replica-with-config": raw(
                "POST",
                "/gate/v1/replicas",
                {"service": "worker-default", "number": 91, "HostConfig": {"Privileged": True}},
            ),
            "encoded-path": raw("GET", "/containers/%2e%2e/json"),
        }
    )
)
