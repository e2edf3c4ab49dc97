"""A TCP relay whose connections can be cut while the server behind it stays up.

What a worker meets when its broker connection breaks without the broker going away, or is
noticed as broken only once the broker is back: a NAT or load balancer dropping its table, or
Docker tearing down a restarted container's endpoint (the nemesis campaign's workers saw their
Redis connection lost a second after the restarted Redis answered again). Locally a killed
redis-server closes its sockets at once, so the worker notices while Redis is down; behind this
relay the test chooses: :meth:`TcpCut.reset` aborts every relayed connection (RST to both sides)
with the upstream answering.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class TcpCut:
    """Relays 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``; :meth:`reset` cuts it all."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.resets = 0

    def start(self) -> TcpCut:
        threading.Thread(target=self._accept, daemon=True, name="tcp-cut-accept").start()
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def reset(self) -> int:
        """Abort every relayed connection now (SO_LINGER 0: an RST, as a dropped NAT entry
        answers the next packet); new connections are relayed as before. The number cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.resets += 1
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with contextlib.suppress(OSError):
                    sock.close()
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the upstream is down: refused, as the server itself would
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the other (a reset already closed both)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
