"""A TCP relay whose connections can be cut while the server behind it stays up.

What a worker meets when its broker connection breaks without the broker going away, or is
noticed as broken only once the broker is back: a NAT or load balancer dropping its table, or
Docker tearing down a restarted container's endpoint (the nemesis campaign's workers saw their
Redis connection lost a second after the restarted Redis answered again). Locally a killed
redis-server closes its sockets at once, so the worker notices while Redis is down; behind this
relay the test chooses: :meth:`TcpCut.reset` aborts every relayed connection (RST to both sides)
with the upstream answering, and :meth:`TcpCut.cut_after_reply` cuts at the worst moment of a
Redis consumer: right after a reply holding a given marker (a task id: the BRPOP that took that
task) reached the client, before anything the client sends next reaches the server, and then
refuses connections for a while, as a restarting Redis does.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


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
        self._marker: bytes | None = None
        self._refuse_for_s = 0.0
        self._frozen = False  # after the marked reply: nothing more reaches the upstream
        self._refuse_until = 0.0
        self.marker_seen = threading.Event()

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
            _abort(pair)
        return len(pairs)

    def cut_after_reply(self, marker: bytes, refuse_for_s: float) -> None:
        """Once: when a reply from the upstream holds ``marker``, deliver it, drop whatever any
        client sends after it, cut every connection and refuse new ones for ``refuse_for_s``
        (longer than redis-py's retries, as a Redis restart is)."""
        self._refuse_for_s = refuse_for_s
        self._marker = marker

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
            if time.monotonic() < self._refuse_until:
                client.close()  # "restarting": the connection ends at once
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the upstream is down: refused, as the server itself would
                continue
            with self._lock:  # a cut takes the same lock: a pair is cut with the others, or refused
                if self._frozen or time.monotonic() < self._refuse_until:
                    _abort((client, upstream))
                    continue
                self._pairs.append((client, upstream))
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if to_upstream and self._frozen:
                    # Sent after the marked reply, on a connection the cut may not have reached
                    # yet (opened just then): it goes too. Dropping the bytes and keeping the
                    # connection would leave the client waiting for a reply that never comes.
                    _abort((src, dst))
                    return
                marker = self._marker
                if not to_upstream and marker is not None and marker in data:
                    with self._lock:
                        self._marker = None
                        self._frozen = True
                        self._refuse_until = time.monotonic() + self._refuse_for_s
                    dst.sendall(data)
                    self.reset()
                    self._frozen = False  # new connections stay refused until _refuse_until
                    self.marker_seen.set()
                    return
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the other (a reset already closed both)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _abort(pair: tuple[socket.socket, socket.socket]) -> None:
    """Close both sockets with an RST (SO_LINGER 0), as a dropped NAT entry answers."""
    for sock in pair:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.close()
