"""The gate's connection to the Docker engine: one HTTP/1.1 request per connection (h11 over anyio).

Every request is composed by the gate (method, path, parameters and body from its own rules and
the engine's answers); nothing a caller sent is forwarded as such. The API version is pinned,
whatever a caller asked for. Asynchronous, so long calls (a stop waiting out a grace period, a
wait, an event stream) hold no thread and end when the caller goes away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import anyio
import anyio.abc
import h11

API_VERSION = "1.41"  # Engine 20.10's; the oldest a caller may name and the one the gate speaks
DEFAULT_HOST = "unix:///var/run/docker.sock"


class EngineError(Exception):
    """An engine answer >= 400 (status and the engine's message), or no answer (502, 504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def segment(value: str) -> str:
    """A path parameter quoted whole (a '/' or '..' in it stays inside the segment)."""
    return quote(value, safe="")


def message_of(data: bytes) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace").strip()
    if isinstance(parsed, dict) and "message" in parsed:
        return str(parsed["message"])
    return data.decode("utf-8", "replace").strip()


class Engine:
    def __init__(self, docker_host: str | None = None, api_version: str = API_VERSION):
        host = docker_host or DEFAULT_HOST
        self.unix: str | None = None
        self.tcp: tuple[str, int] | None = None
        if host.startswith("unix://"):
            self.unix = host[len("unix://") :]
        elif host.startswith(("tcp://", "http://")):
            parts = urlsplit(host)
            self.tcp = (parts.hostname or "127.0.0.1", parts.port or 2375)
        else:
            raise ValueError(f"DOCKER_HOST={host!r}: expected unix:///path or tcp://host:port")
        self.prefix = f"/v{api_version}"
        self.host = host

    async def _connect(self) -> anyio.abc.ByteStream:
        if self.unix is not None:
            return await anyio.connect_unix(self.unix)
        assert self.tcp is not None
        return await anyio.connect_tcp(*self.tcp)

    def target(self, path: str, params: dict[str, Any] | None = None) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        return f"{self.prefix}{path}{'?' + query if query else ''}"

    @asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: Any = None,
    ) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """The response's status and its body's chunks, while the connection is open."""
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", "docker"), ("User-Agent", "scaler-gate"), ("Connection", "close")]
        if method in ("POST", "PUT") or body is not None:
            headers.append(("Content-Length", str(len(payload))))
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        try:
            stream = await self._connect()
        except OSError as exc:
            raise EngineError(502, f"gate: the engine ({self.host}) is unreachable: {exc}") from exc
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            out = conn.send(
                h11.Request(method=method, target=self.target(path, params), headers=headers)
            )
            if payload:
                out += conn.send(h11.Data(data=payload)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            try:
                await stream.send(out or b"")
            except (OSError, anyio.BrokenResourceError) as exc:
                raise EngineError(502, f"gate: the engine closed the connection: {exc}") from exc

            async def event() -> Any:
                while True:
                    got = conn.next_event()
                    if got is not h11.NEED_DATA:
                        return got
                    try:
                        data = await stream.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        data = b""
                    conn.receive_data(data)

            try:
                response = await event()
                while isinstance(response, h11.InformationalResponse):
                    response = await event()
            except h11.RemoteProtocolError as exc:
                raise EngineError(502, f"gate: the engine's answer is not HTTP: {exc}") from exc
            if not isinstance(response, h11.Response):
                raise EngineError(502, "gate: the engine closed the connection without an answer")

            async def chunks() -> AsyncIterator[bytes]:
                while True:
                    got = await event()
                    if isinstance(got, h11.Data):
                        yield bytes(got.data)
                    elif isinstance(got, h11.EndOfMessage | h11.ConnectionClosed):
                        return

            yield response.status_code, chunks()

    async def call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = 30.0,
    ) -> tuple[int, bytes]:
        """The whole answer: (status, body); EngineError 504 past ``timeout_s`` (None: none)."""
        try:
            with anyio.fail_after(timeout_s):
                async with self.open(method, path, params, body) as (status, chunks):
                    data = b"".join([chunk async for chunk in chunks])
        except TimeoutError as exc:
            raise EngineError(504, f"gate: the engine did not answer within {timeout_s}s") from exc
        except h11.RemoteProtocolError as exc:
            raise EngineError(502, f"gate: the engine's answer is not HTTP: {exc}") from exc
        return status, data

    async def json(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = 30.0,
    ) -> Any:
        """The answer's JSON; EngineError for a status >= 400."""
        status, data = await self.call(method, path, params, body, timeout_s)
        if status >= 400:
            raise EngineError(status, message_of(data))
        return json.loads(data) if data.strip() else None
