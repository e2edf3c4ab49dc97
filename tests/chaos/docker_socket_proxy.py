"""A Unix-socket proxy in front of the Docker engine that the test can cut and restore.

The stack's scaler reaches the engine through the engine gate (scaler/gate), which bind-mounts
the socket from $DOCKER_SOCKET; the chaos stack points that at this proxy, so the cut is between
the gate and the engine (the gate then answers 5xx, as with a dead dockerd).
While cut, every open connection (API calls, streaming stats readers) is closed and new ones are
accepted and closed at once: to the scaler that is what a restarting or crashed dockerd looks like
(connection reset / refused), and the engine itself and every other client keep working. `docker
pause` would freeze the scaler instead, which tests nothing about how it handles an unreachable
engine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

CHUNK = 65536


class DockerSocketProxy:
    """Forwards ``path`` to ``upstream`` byte for byte until ``cut()``; ``restore()`` resumes."""

    def __init__(self, path: Path, upstream: str = "/var/run/docker.sock", gid: int = -1) -> None:
        self.path = path
        self.upstream = upstream
        self.gid = gid
        self.cut_event = threading.Event()
        self.refused = 0
        self._server: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        # The scaler runs as uid 10001 in the socket's group, as with the real socket.
        os.chown(self.path, -1, self.gid)
        os.chmod(self.path, 0o660)
        server.listen(64)
        server.settimeout(0.5)
        self._server = server
        threading.Thread(target=self._accept, name="docker-socket-proxy", daemon=True).start()

    def cut(self) -> None:
        """The engine becomes unreachable: drop every connection, refuse new ones."""
        self.cut_event.set()
        with self._lock:
            for sock in list(self._open):
                self._close(sock)

    def restore(self) -> None:
        self.cut_event.clear()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _close(self, sock: socket.socket) -> None:
        self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.cut_event.is_set():
                self.refused += 1
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._close(src)
                self._close(dst)
