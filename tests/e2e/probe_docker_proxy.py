"""Run inside the scaler's container (stdin of `docker compose exec -T scaler python - ID NAME`):
what the scaler's own Docker client may and may not do through docker-proxy.

Prints one JSON object: per call, "ok" or the HTTP status and the explanation of the refusal.
ID is a worker container to aim exec at, NAME a container name the creates would use.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

worker, name = sys.argv[1], sys.argv[2]
client = docker.from_env(timeout=20)  # DOCKER_HOST=tcp://docker-proxy:2375
api = client.api
image = api.inspect_container(worker)["Config"]["Image"]


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        fn()
    except docker.errors.APIError as exc:
        return {"status": exc.status_code, "message": str(exc.explanation)}
    return {"status": "ok"}


def create(**host: Any) -> Callable[[], Any]:
    return lambda: api.create_container(
        image, "true", name=name, host_config=api.create_host_config(**host)
    )


print(
    json.dumps(
        {
            "ping": attempt(api.ping),
            "list": attempt(lambda: api.containers(all=True)),
            "inspect": attempt(lambda: api.inspect_container(worker)),
            "exec": attempt(lambda: api.exec_create(worker, ["id"])),
            "pull": attempt(lambda: api.pull("busybox", tag="latest")),
            "volume": attempt(lambda: api.create_volume(name)),
            "privileged": attempt(create(privileged=True)),
            "host-root": attempt(create(binds=["/:/host"])),
            "host-pid": attempt(create(pid_mode="host")),
        }
    )
)
