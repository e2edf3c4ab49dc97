"""``python -m scaler.gate``: serve the gate on GATE_LISTEN (default 0.0.0.0:2375).

Settings from the environment: GATE_PROJECT (a Compose project) or GATE_STACK (a Swarm stack
namespace), GATE_TOKEN_FILE (the bearer token's file) or GATE_TOKEN, DOCKER_HOST (the engine,
default the socket), GATE_ALLOWED_BIND_MOUNTS (comma-separated host paths a template may bind).
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from scaler.gate.app import Gate, Settings
from scaler.gate.serve import uvicorn_config


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
    except (ValueError, OSError) as exc:
        print(f"scaler.gate: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("scaler.gate").info(
        "gate for %s on %s:%d, engine %s",
        settings.scope,
        settings.host,
        settings.port,
        settings.docker_host or "unix:///var/run/docker.sock",
    )
    uvicorn.Server(uvicorn_config(Gate(settings), settings.host, settings.port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
