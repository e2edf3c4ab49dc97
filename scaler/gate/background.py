"""The gate served in a thread of this process (tests and benchmarks of the Compose backend).

The same ASGI application and server settings as ``python -m scaler.gate``, on a free loopback
port: ``with BackgroundGate(settings) as gate: ... gate.url``. Not for production, where the gate
is a process (a container) of its own and the only holder of the socket.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from scaler.gate.app import Gate, Settings
from scaler.gate.engine import Engine
from scaler.gate.serve import READ_TIMEOUT_S, uvicorn_config


class BackgroundGate:
    """uvicorn (h11) serving the gate in a daemon thread on 127.0.0.1 and a free port
    (``read_timeout_s``: the header-read deadline, shorter in tests)."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, read_timeout_s: float | None = None
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.gate = Gate(settings, engine)
        config = uvicorn_config(
            self.gate, "127.0.0.1", self.port, read_timeout_s=read_timeout_s or READ_TIMEOUT_S
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gate", daemon=True)

    @property
    def url(self) -> str:
        """Its address as a DOCKER_HOST (``tcp://127.0.0.1:PORT``)."""
        return f"tcp://127.0.0.1:{self.port}"

    def __enter__(self) -> BackgroundGate:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gate did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
