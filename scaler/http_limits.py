"""What uvicorn's h11 server lacks against slow and greedy clients, for the servers of this project
(the scaler's API, scaler/api.py, and the engine gate, scaler/gate/).

uvicorn has no header-read timeout: its keep-alive timer stops at a request's first byte, so a
client that dribbles a header byte at a time holds its connection for ever (slow-loris). Here:

- a read deadline: a request's head and body must arrive within ``read_timeout_s`` (408 and the
  connection closed past it, however steadily the bytes trickle in), counted from the
  connection's start or the previous response (``from_first_byte=False``, the scaler's API), or
  from the request's first byte (``from_first_byte=True``, the gate: its clients keep idle
  connections for their next cycle, which only uvicorn's keep-alive timeout then ends);
- caps on open connections, per client address and in all, checked as a connection is made: one
  past a cap displaces the oldest connection of that client (or of all) that has not yet sent a
  whole request; only when every one is in the middle of a request is it answered 503;
- a connection that sends nothing is closed after uvicorn's keep-alive timeout (uvicorn starts
  that timer only after a first response).

``ConnectionGuard`` holds one server's connections; ``guarded_protocol(guard)`` is the protocol
class to give ``uvicorn.Config(http=...)`` (with ``limit_concurrency=None``: uvicorn's own cap
would count slow readers too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

GUARD_LOG_EVERY_S = 60.0
# The client's side of a request is whole: what follows is the application's time, not a read.
RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class ConnectionGuard:
    """One server's open connections, oldest first, and its caps on them. Used only from the
    server's event loop, so it needs no lock.

    ``error_key`` names the field of the JSON answers of the guard's own (408, 503): the scaler's
    API answers ``{"error": ...}``, the gate ``{"message": ...}`` as the engine does."""

    def __init__(
        self,
        read_timeout_s: float,
        limit: int,
        limit_per_client: int,
        *,
        from_first_byte: bool = False,
        error_key: str = "error",
        logger: logging.Logger = log,
    ) -> None:
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0 seconds, got {read_timeout_s!r}")
        if not 1 <= limit_per_client <= limit:
            raise ValueError(f"expected 1 <= limit_per_client ({limit_per_client}) <= {limit}")
        self.read_timeout_s = read_timeout_s
        self.limit = limit
        self.limit_per_client = limit_per_client
        self.from_first_byte = from_first_byte
        self.error_key = error_key
        self.logger = logger
        self.open: dict[GuardedProtocol, None] = {}  # insertion order: the oldest first
        self.counts = {"timed_out": 0, "displaced": 0, "refused": 0}
        self._logged = dict(self.counts)
        self._logged_at = -GUARD_LOG_EVERY_S

    def admit(self, conn: GuardedProtocol) -> bool:
        """Track ``conn``, displacing the oldest connection still sending its request from its
        client's share, then from all, when a cap is reached; False (refuse ``conn``) when every
        connection of the full group is in the middle of a request."""
        mine = [c for c in self.open if c.peer == conn.peer]
        if len(mine) >= self.limit_per_client and not self._displace(mine):
            self.count("refused")
            return False
        if len(self.open) >= self.limit and not self._displace(list(self.open)):
            self.count("refused")
            return False
        self.open[conn] = None
        return True

    def _displace(self, group: list[GuardedProtocol]) -> bool:
        waiting = [c for c in group if c.reading_since is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.reading_since or 0.0)
        self.count("displaced")
        oldest.drop()
        return True

    def forget(self, conn: GuardedProtocol) -> None:
        self.open.pop(conn, None)

    def count(self, what: str) -> None:
        """Count a closed or refused connection; a warning at most every GUARD_LOG_EVERY_S
        says how many since the last one (an attack must not flood the log)."""
        self.counts[what] += 1
        now = time.monotonic()
        if now - self._logged_at >= GUARD_LOG_EVERY_S:
            since = {k: v - self._logged[k] for k, v in self.counts.items()}
            self.logger.warning(
                "HTTP connections closed since the last report: %(timed_out)s past the %(t)s s "
                "read timeout, %(displaced)s displaced by newer ones at a cap, %(refused)s "
                "refused (every slot mid-request)",
                {**since, "t": self.read_timeout_s},
            )
            self._logged, self._logged_at = dict(self.counts), now

    def timeout_response(self) -> bytes:
        """The 408 written to a request not received within the deadline."""
        since = "its first byte" if self.from_first_byte else "the connection's start"
        message = f"request not received within {self.read_timeout_s:g} s of {since}"
        body = json.dumps({self.error_key: message}).encode()
        return (
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def busy_app(self) -> ASGIApp:
        """The answer to a connection past a cap while every connection in its way is
        mid-request: 503."""
        body = json.dumps(
            {self.error_key: "every connection slot is busy with a request; try again in a moment"}
        ).encode()

        async def refuse_busy(scope: Scope, receive: Receive, send: Send) -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return refuse_busy


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus what it lacks against slow clients (the module's docstring):
    the read deadline, the guard's caps, and the keep-alive timeout from the connection's start.

    ``guard`` is set on a subclass made for each server (``guarded_protocol``)."""

    guard: ClassVar[ConnectionGuard]
    peer = "unknown"
    reading_since: float | None = None
    _read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = self.client[0] if self.client else "unknown"
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        if not self.guard.admit(self):
            if len(self.connections) > 2 * self.guard.limit:
                transport.close()  # refused ones waiting for their 503 are bounded too
                return
            self.app = self.guard.busy_app()  # its request, once the head is in, is answered 503
        self._start_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_reading()
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.reading_since is not None and self._read_deadline is None:
            self._arm()  # from_first_byte: this is the request's first byte
        super().data_received(data)
        if self.reading_since is not None and self.conn.their_state in RECEIVED:
            self._stop_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next (pipelined) request
        if self.transport.is_closing():
            return
        if self.conn.their_state not in RECEIVED:
            self._start_reading()

    def drop(self) -> None:
        """Close this connection to make room for a newer one (it is still sending a request)."""
        self.guard.forget(self)
        self._stop_reading()
        self.transport.close()

    def _started(self) -> bool:
        """Some of the next request has arrived (its head under way, or pipelined bytes)."""
        return self.conn.their_state is not h11.IDLE or bool(self.conn.trailing_data[0])

    def _start_reading(self) -> None:
        self._stop_reading()
        self.reading_since = self.loop.time()
        if not self.guard.from_first_byte or self._started():
            self._arm()

    def _arm(self) -> None:
        self._read_deadline = self.loop.call_later(self.guard.read_timeout_s, self._read_timed_out)

    def _stop_reading(self) -> None:
        self.reading_since = None
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        self.reading_since = None
        self.guard.forget(self)
        if self.transport.is_closing():
            return
        self.guard.count("timed_out")
        # 408 to a request under way; an idle keep-alive connection is closed without a word (a
        # client would take an unasked-for answer for the reply to its next request).
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if self._started() and not answering:
            self.transport.write(self.guard.timeout_response())
        self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """The protocol class for one server's ``uvicorn.Config(http=...)``, bound to ``guard``."""

    class Protocol(GuardedProtocol):
        pass

    Protocol.guard = guard
    return Protocol
