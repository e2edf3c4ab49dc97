"""The gate's HTTP API: the route table below is the whole of what a caller can ask of the engine.

Before any route runs: the bearer token (401), a clean path (no '%', empty or dot segments: else
not an operation), the API version prefix (1.41 or newer, else 400), no Transfer-Encoding or
Content-Encoding (400), at most 4 KiB of body (413), each query parameter once and one the route
reads (400). A method and path not in the table is 403 ``{"message": "gate: <METHOD> <path> is
not an operation of the gate"}``. Every refusal is logged as one JSON line and counted
(``GET /gate/v1/status``). Container operations first resolve the id or name and check its
labels (rules.Scope), then act on the resolved id; an absent or unmanaged container is the same
404 to the caller. Answers of the engine to a request the gate composed pass through with their
status (a conflict, a swarm that is not one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope

from scaler.gate import rules
from scaler.gate.clone import CloneRefused, ReplicaRequest, create_replica
from scaler.gate.engine import API_VERSION, Engine, EngineError, message_of, segment
from scaler.gate.rules import BadInput, Scope
from scaler.gate.snapshot import Snapshot

log = logging.getLogger("scaler.gate")

MAX_BODY = 4096
BODY_TIMEOUT_S = 10.0
DEFAULT_STOP_TIMEOUT_S = 10  # the engine's own, for a container without StopTimeout
SIGNALS = {"KILL": "SIGKILL", "SIGKILL": "SIGKILL", "TERM": "SIGTERM", "SIGTERM": "SIGTERM"}
WAIT_CONDITIONS = ("not-running", "next-exit", "removed")
REF = r"(?P<ref>[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127})"
CLEAN_PATH = re.compile(r"^(/[A-Za-z0-9_.:-]+)+$")
VERSION_PREFIX = re.compile(r"^/v(\d{1,3})\.(\d{1,3})(/.*)$")
# Filter keys a caller may narrow by (the engine resolves no reference to another object in them).
CONTAINER_FILTERS = frozenset({"label", "name", "id", "status", "health", "exited", "network"})
EVENT_FILTERS = frozenset({"label", "event", "container", "type"})
SERVICE_FILTERS = frozenset({"label", "name", "id", "mode"})
TASK_FILTERS = frozenset({"service", "desired-state", "label", "name", "id", "node"})
NODE_FILTERS = frozenset({"id", "label", "membership", "name", "role", "node.label"})
TIMESTAMP = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Refused(Exception):
    """An answer of the gate's own: ``kind`` (when set) is counted and logged as a refusal."""

    def __init__(self, status: int, message: str, kind: str | None = None, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Settings:
    scope: Scope
    token: str | None  # None only when GATE_INSECURE_NO_TOKEN=1 (tests)
    docker_host: str | None = None
    allowed_bind_mounts: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 2375
    snapshot: bool = True  # keep and serve GET /gate/v1/snapshot (a Compose project's gate)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        project, stack = env.get("GATE_PROJECT", ""), env.get("GATE_STACK", "")
        if bool(project) == bool(stack):
            raise ValueError("set exactly one of GATE_PROJECT (Compose) and GATE_STACK (Swarm)")
        if not NAME.match(project or stack):
            raise ValueError(f"project or stack {project or stack!r}: expected {NAME.pattern}")
        scope = Scope(rules.PROJECT_LABEL, project) if project else Scope(rules.STACK_LABEL, stack)
        token: str | None = None
        # The file first; GATE_TOKEN where a file cannot be given (Compose refuses an
        # environment-sourced secret in a read-only container: compose/compose.yaml).
        source = "GATE_TOKEN_FILE" if env.get("GATE_TOKEN_FILE") else "GATE_TOKEN"
        if source == "GATE_TOKEN_FILE":
            token = Path(env["GATE_TOKEN_FILE"]).read_text().strip()
        elif env.get("GATE_TOKEN"):
            token = env["GATE_TOKEN"].strip()
        elif env.get("GATE_INSECURE_NO_TOKEN") != "1":
            raise ValueError(
                "GATE_TOKEN_FILE (a file holding the bearer token) or GATE_TOKEN is required"
            )
        if token is not None and (
            len(token) < 16 or not token.isascii() or not token.isprintable()
        ):
            raise ValueError(f"{source}: expected at least 16 printable ASCII characters")
        listen = env.get("GATE_LISTEN", "0.0.0.0:2375")
        host, _, port = listen.rpartition(":")
        mounts = tuple(m.strip() for m in env.get("GATE_ALLOWED_BIND_MOUNTS", "").split(","))
        return cls(
            scope=scope,
            token=token,
            docker_host=env.get("DOCKER_HOST") or None,
            allowed_bind_mounts=tuple(m for m in mounts if m),
            host=host.strip("[]") or "0.0.0.0",
            port=int(port),
            snapshot=env.get("GATE_SNAPSHOT", "1") != "0",
        )


@dataclass
class Call:
    """One request as the routes see it: the path without its version prefix, read strictly."""

    method: str
    path: str  # as sent, for messages
    match: dict[str, str]
    params: dict[str, str]
    body: bytes
    request: Request

    @property
    def what(self) -> str:
        return f"{self.method} {self.path}"


Handler = Callable[["Gate", Call], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    params: frozenset[str] = frozenset()
    mode: str = "any"  # "any", "project" (Compose) or "stack" (Swarm)
    name: str = ""
    body: bool = False  # a JSON body (the gate's own operations); any other takes none


class EngineStream(Response):
    """A streamed engine answer (events, stats): ends with the engine's or the caller's end."""

    def __init__(self, stack: AsyncExitStack, chunks: AsyncIterator[bytes]):
        super().__init__(media_type="application/json")
        self.stack = stack
        self.chunks = chunks

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            async with anyio.create_task_group() as group:

                async def gone() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(gone)
                async for piece in self.chunks:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        finally:
            await self.stack.aclose()


@dataclass
class Counters:
    refused: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)


class Gate:
    """The ASGI application."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.scope = settings.scope
        self.engine = engine or Engine(settings.docker_host)
        self.counters = Counters()
        self.started = time.time()
        self._expected = f"Bearer {settings.token}".encode() if settings.token is not None else None
        keep = settings.snapshot and self.scope.kind == "project"
        self.snapshot = Snapshot(self.engine, self.scope) if keep else None
        self._keeper: asyncio.Task[None] | None = None

    def _keep_snapshot(self) -> None:
        """Start following the engine (once, in the server's loop: at its startup, else at the
        first request)."""
        if self.snapshot is not None and self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self.snapshot.run())

    async def _stop_snapshot(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._keep_snapshot()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self._stop_snapshot()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self._keep_snapshot()
        request = Request(scope, receive)
        raw = scope.get("raw_path") or scope["path"].encode()
        shown = raw.decode("ascii", "backslashreplace")
        try:
            response = await self._handle(request, scope["method"], shown)
        except Refused as refused:
            response = self._refusal(scope["method"], shown, refused)
        except EngineError as exc:
            status = exc.status if 400 <= exc.status <= 599 else 502
            if status >= 500:
                log.warning(
                    json.dumps(
                        {
                            "ts": round(time.time(), 3),
                            "event": "engine-error",
                            "method": scope["method"],
                            "path": shown,
                            "status": status,
                            "message": exc.message,
                        }
                    )
                )
            response = JSONResponse({"message": exc.message}, status_code=status)
        except Exception as exc:  # a bug or an engine answer of an unexpected shape
            log.exception("gate: %s %s failed", scope["method"], shown)
            text = f"gate: {scope['method']} {shown} failed: {type(exc).__name__}"
            response = JSONResponse({"message": text}, status_code=500)
        await response(scope, receive, send)

    def _refusal(self, method: str, path: str, refused: Refused) -> Response:
        if refused.kind is not None:
            self.counters.refused[refused.kind] += 1
            record = {
                "ts": round(time.time(), 3),
                "event": "refused",
                "kind": refused.kind,
                "method": method,
                "path": path,
                "status": refused.status,
                "message": refused.message,
            }
            if refused.detail:
                record["detail"] = refused.detail
            log.warning(json.dumps(record, ensure_ascii=True))
        return JSONResponse({"message": refused.message}, status_code=refused.status)

    async def _handle(self, request: Request, method: str, shown: str) -> Response:
        self._authorise(request)
        path = self._route_path(method, shown)
        route, match = self._route(method, path, shown)
        headers = request.headers
        if "transfer-encoding" in headers or "content-encoding" in headers:
            raise Refused(
                400, f"gate: {method} {shown}: a chunked or encoded body is not read", "bad-body"
            )
        lengths = headers.getlist("content-length")
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            raise Refused(400, f"gate: {method} {shown}: bad Content-Length", "bad-body")
        if lengths and int(lengths[0]) > MAX_BODY:
            raise Refused(
                413,
                f"gate: {method} {shown}: a body over {MAX_BODY} bytes is not read",
                "too-large",
            )
        body = await self._body(request, method, shown)
        if body and not route.body:
            raise Refused(400, f"gate: {method} {shown}: this operation takes no body", "bad-body")
        call = Call(method, shown, match, self._params(route, request, shown), body, request)
        response = await route.handler(self, call)
        self.counters.served[route.name] += 1
        return response

    def _authorise(self, request: Request) -> None:
        if self._expected is None:
            return
        given = [v.encode("latin-1") for k, v in request.headers.items() if k == "authorization"]
        if len(given) != 1 or not hmac.compare_digest(given[0], self._expected):
            raise Refused(401, "gate: a valid bearer token is required", "unauthorised")

    def _route_path(self, method: str, shown: str) -> str:
        if not CLEAN_PATH.match(shown) or "/./" in f"{shown}/" or "/../" in f"{shown}/":
            raise Refused(
                403, f"gate: {method} {shown} is not an operation of the gate", "not-an-operation"
            )
        prefix = VERSION_PREFIX.match(shown)
        if prefix is None:
            return shown
        asked = (int(prefix.group(1)), int(prefix.group(2)))
        pinned = tuple(int(p) for p in API_VERSION.split("."))
        if asked < pinned:
            raise Refused(
                400,
                f"gate: {method} {shown}: API version {asked[0]}.{asked[1]} is "
                f"older than {API_VERSION}, the oldest the gate speaks",
                "old-api-version",
            )
        if prefix.group(3).startswith("/gate/"):
            raise Refused(
                403, f"gate: {method} {shown} is not an operation of the gate", "not-an-operation"
            )
        return prefix.group(3)

    def _route(self, method: str, path: str, shown: str) -> tuple[Route, dict[str, str]]:
        mode = self.scope.kind
        for route in ROUTES:
            if route.method != method or route.mode not in ("any", mode):
                continue
            match = route.pattern.fullmatch(path)
            if match:
                return route, match.groupdict()
        raise Refused(
            403, f"gate: {method} {shown} is not an operation of the gate", "not-an-operation"
        )

    async def _body(self, request: Request, method: str, shown: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise Refused(
                            413,
                            f"gate: {method} {shown}: a body over {MAX_BODY} bytes is not read",
                            "too-large",
                        )
                    chunks.append(chunk)
        except TimeoutError as exc:
            raise Refused(
                408, f"gate: {method} {shown}: the body did not arrive in time", "slow-body"
            ) from exc
        except ClientDisconnect as exc:  # gone, or closed at the read deadline (http_limits)
            raise Refused(
                408, f"gate: {method} {shown}: the connection closed before the body", "slow-body"
            ) from exc
        return b"".join(chunks)

    def _params(self, route: Route, request: Request, shown: str) -> dict[str, str]:
        query = request.scope.get("query_string", b"").decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        params: dict[str, str] = {}
        for key, value in pairs:
            if key in params:
                raise Refused(
                    400,
                    f"gate: {route.method} {shown}: query parameter {key!r} given twice",
                    "bad-query",
                )
            if key not in route.params:
                raise Refused(
                    400,
                    f"gate: {route.method} {shown}: query parameter {key!r} is "
                    "not read by this operation",
                    "bad-query",
                )
            params[key] = value
        return params

    # -- helpers -------------------------------------------------------------------------------

    async def managed(self, call: Call, ref: str) -> dict[str, Any]:
        """The inspected managed container ``ref`` (id or name); 404 if absent or unmanaged."""
        refused = Refused(404, f"gate: {call.what}: no managed container {ref!r} in {self.scope}")
        try:
            inspected = await self.engine.json("GET", f"/containers/{segment(ref)}/json")
        except EngineError as exc:
            if exc.status == 404:
                raise refused from exc
            raise
        if not self.scope.holds((inspected.get("Config") or {}).get("Labels")):
            refused.kind = "not-managed"
            refused.detail = f"{str(inspected.get('Name', '')).lstrip('/')} is not managed"
            raise refused
        return dict(inspected)

    def body_json(self, call: Call) -> Any:
        kind = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(
                415, f"gate: {call.what}: expected Content-Type application/json", "bad-body"
            )
        try:
            return rules.strict_json(call.body)
        except BadInput as exc:
            raise Refused(400, f"gate: {call.what}: {exc}", "bad-body") from exc

    def filters(self, call: Call, keys: frozenset[str]) -> dict[str, list[str]]:
        try:
            return rules.parse_filters(call.params.get("filters"), keys)
        except BadInput as exc:
            raise Refused(400, f"gate: {call.what}: {exc}", "bad-query") from exc

    def flag(self, call: Call, name: str) -> bool | None:
        value = call.params.get(name)
        return None if value is None else rules.boolean(value)

    def integer(self, call: Call, name: str, low: int, high: int) -> int | None:
        value = call.params.get(name)
        if value is None:
            return None
        try:
            return rules.integer(name, value, low, high)
        except BadInput as exc:
            raise Refused(400, f"gate: {call.what}: {exc}", "bad-query") from exc

    async def watched(
        self, call: Call, work: Callable[[], Awaitable[tuple[int, bytes]]]
    ) -> Response:
        """A long engine call (a stop waiting out a grace period, a wait) given up when its
        caller goes away; the engine's answer passed on."""
        answers: list[tuple[int, bytes]] = []
        async with anyio.create_task_group() as group:

            async def gone() -> None:
                while (await call.request.receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(gone)
            answers.append(await work())
            group.cancel_scope.cancel()
        if not answers:
            return Response(status_code=499)  # nobody to answer
        status, data = answers[0]
        if status >= 400:
            raise EngineError(status, message_of(data))
        return _passthrough(status, data)

    async def stream(
        self, path: str, params: dict[str, Any], keep: Callable[[bytes], bool] | None = None
    ) -> Response:
        """An engine stream passed on (whole JSON lines through ``keep`` when given)."""
        stack = AsyncExitStack()
        try:
            status, chunks = await stack.enter_async_context(self.engine.open("GET", path, params))
            if status >= 400:
                data = b"".join([c async for c in chunks])
                raise EngineError(status, message_of(data))
        except BaseException:
            await stack.aclose()
            raise
        if keep is None:
            return EngineStream(stack, chunks)

        async def lines() -> AsyncIterator[bytes]:
            buffer = b""
            async for chunk in chunks:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip() and keep(line):
                        yield line + b"\n"

        return EngineStream(stack, lines())


def _passthrough(status: int, data: bytes) -> Response:
    if status in (204, 304) or not data:
        return Response(status_code=status)
    return Response(data, status_code=status, media_type="application/json")


def _timestamp(call: Call, name: str) -> str | None:
    value = call.params.get(name)
    if value is not None and not TIMESTAMP.match(value):
        raise Refused(
            400, f"gate: {call.what}: {name}={value!r}: expected a Unix timestamp", "bad-query"
        )
    return value


def _flag01(value: bool | None) -> str | None:
    return None if value is None else ("1" if value else "0")


async def _refresh(gate: Gate, cid: str) -> None:
    """After an action of the gate's own: its container's entry in the snapshot read again, so
    the caller's next snapshot shows what it did (the event would, a moment later)."""
    if gate.snapshot is None or not gate.snapshot.ready:
        return
    try:
        await gate.snapshot.refresh(cid)
    except EngineError as exc:  # the event stream, or the next check, brings it
        log.warning("gate: the snapshot's entry of %s was not read again: %s", cid[:12], exc)


# -- the engine's reads ------------------------------------------------------------------------


async def ping(gate: Gate, call: Call) -> Response:
    status, data = await gate.engine.call("GET", "/_ping", timeout_s=10)
    if status >= 400:
        raise EngineError(status, message_of(data))
    body = "" if call.method == "HEAD" else "OK"
    return PlainTextResponse(body, headers={"Api-Version": API_VERSION, "OSType": "linux"})


async def version(gate: Gate, call: Call) -> Response:
    return JSONResponse(rules.version_view(await gate.engine.json("GET", "/version"), API_VERSION))


async def info(gate: Gate, call: Call) -> Response:
    return JSONResponse(rules.info_view(await gate.engine.json("GET", "/info")))


async def list_containers(gate: Gate, call: Call) -> Response:
    params = {
        "all": _flag01(gate.flag(call, "all")),
        "size": _flag01(gate.flag(call, "size")),
        "limit": gate.integer(call, "limit", -1, 100_000),
        "filters": rules.narrowed(gate.filters(call, CONTAINER_FILTERS), gate.scope),
    }
    rows = await gate.engine.json("GET", "/containers/json", params)
    return JSONResponse([r for r in rows or [] if gate.scope.holds(r.get("Labels"))])


async def inspect_container(gate: Gate, call: Call) -> Response:
    return JSONResponse(rules.sanitise_container(await gate.managed(call, call.match["ref"])))


async def stats(gate: Gate, call: Call) -> Response:
    container = await gate.managed(call, call.match["ref"])
    stream = gate.flag(call, "stream")
    one_shot = gate.flag(call, "one-shot")
    params = {"stream": _flag01(stream is not False), "one-shot": _flag01(one_shot)}
    path = f"/containers/{segment(container['Id'])}/stats"
    if stream is False:
        return JSONResponse(await gate.engine.json("GET", path, params))
    return await gate.stream(path, params)


async def events(gate: Gate, call: Call) -> Response:
    filters = gate.filters(call, EVENT_FILTERS)
    types = filters.pop("type", ["container"])
    if "container" not in types:
        raise Refused(
            400,
            f"gate: {call.what}: only container events are an operation of the gate",
            "bad-query",
        )
    since, until = (_timestamp(call, k) for k in ("since", "until"))
    params = {
        "since": since,
        "until": until,
        "filters": rules.narrowed(filters, gate.scope, type=["container"]),
    }

    def keep(line: bytes) -> bool:
        try:
            event = json.loads(line)
        except ValueError:
            return False
        return isinstance(event, dict) and rules.event_kept(event, gate.scope)

    return await gate.stream("/events", params, keep)


# -- the lifecycle of managed containers -------------------------------------------------------


async def start(gate: Gate, call: Call) -> Response:
    container = await gate.managed(call, call.match["ref"])
    status, data = await gate.engine.call("POST", f"/containers/{segment(container['Id'])}/start")
    if status >= 400:
        raise EngineError(status, message_of(data))
    await _refresh(gate, container["Id"])
    return _passthrough(status, b"")


async def stop(gate: Gate, call: Call) -> Response:
    container = await gate.managed(call, call.match["ref"])
    grace = int((container.get("Config") or {}).get("StopTimeout") or DEFAULT_STOP_TIMEOUT_S)
    asked = gate.integer(call, "t", 0, 10**6)
    t = None if asked is None else min(asked, grace)
    path = f"/containers/{segment(container['Id'])}/stop"
    limit = (grace if t is None else t) + 30
    answer = await gate.watched(call, lambda: gate.engine.call("POST", path, {"t": t}, None, limit))
    await _refresh(gate, container["Id"])
    return answer


async def kill(gate: Gate, call: Call) -> Response:
    asked = call.params.get("signal", "SIGKILL")
    # ASCII only: "\u017figkill".upper() is "SIGKILL" (harmless, but not the described names).
    signal = SIGNALS.get(asked.upper()) if asked.isascii() else None
    if signal is None:
        raise Refused(
            403,
            f"gate: {call.what}: signal {asked!r} is not one the gate sends "
            f"(only {sorted(SIGNALS)})",
            "bad-signal",
        )
    container = await gate.managed(call, call.match["ref"])
    path = f"/containers/{segment(container['Id'])}/kill"
    status, data = await gate.engine.call("POST", path, {"signal": signal})
    if status >= 400:
        raise EngineError(status, message_of(data))
    await _refresh(gate, container["Id"])
    return _passthrough(status, b"")


async def wait(gate: Gate, call: Call) -> Response:
    condition = call.params.get("condition")
    if condition is not None and condition not in WAIT_CONDITIONS:
        raise Refused(
            400,
            f"gate: {call.what}: condition {condition!r}: expected one of {list(WAIT_CONDITIONS)}",
            "bad-query",
        )
    container = await gate.managed(call, call.match["ref"])
    path = f"/containers/{segment(container['Id'])}/wait"
    params = {"condition": condition}
    return await gate.watched(call, lambda: gate.engine.call("POST", path, params, None, None))


async def remove(gate: Gate, call: Call) -> Response:
    for name in ("v", "link"):
        if gate.flag(call, name):
            raise Refused(
                403,
                f"gate: {call.what}: {name}=true is not an operation of the gate "
                "(volumes and links are never removed)",
                "remove-volumes",
            )
    container = await gate.managed(call, call.match["ref"])
    force = _flag01(bool(gate.flag(call, "force")))
    path = f"/containers/{segment(container['Id'])}"
    status, data = await gate.engine.call("DELETE", path, {"force": force})
    if status >= 400:
        raise EngineError(status, message_of(data))
    await _refresh(gate, container["Id"])
    return _passthrough(status, b"")


# -- Swarm reads ---------------------------------------------------------------------------


async def _services(gate: Gate) -> list[dict[str, Any]]:
    params = {"filters": rules.narrowed({}, gate.scope)}
    rows = await gate.engine.json("GET", "/services", params)
    return [r for r in rows or [] if gate.scope.holds((r.get("Spec") or {}).get("Labels"))]


async def services(gate: Gate, call: Call) -> Response:
    params = {
        "filters": rules.narrowed(gate.filters(call, SERVICE_FILTERS), gate.scope),
        "status": _flag01(gate.flag(call, "status")),
    }
    rows = await gate.engine.json("GET", "/services", params)
    rows = [r for r in rows or [] if gate.scope.holds((r.get("Spec") or {}).get("Labels"))]
    return JSONResponse([rules.sanitise_service(r) for r in rows])


async def tasks(gate: Gate, call: Call) -> Response:
    filters = gate.filters(call, TASK_FILTERS)
    managed = await _services(gate)
    ids = {str(s["ID"]) for s in managed}
    by_name = {str((s.get("Spec") or {}).get("Name")): str(s["ID"]) for s in managed}
    asked = filters.pop("service", None)
    chosen = sorted(ids if asked is None else {by_name.get(a, a) for a in asked} & ids)
    if not chosen:
        return JSONResponse([])
    filters["service"] = chosen
    rows = await gate.engine.json("GET", "/tasks", {"filters": json.dumps(filters)})
    rows = [r for r in rows or [] if str(r.get("ServiceID")) in ids]
    return JSONResponse([rules.sanitise_task(r) for r in rows])


async def nodes(gate: Gate, call: Call) -> Response:
    filters = gate.filters(call, NODE_FILTERS)
    params = {"filters": json.dumps(filters) if filters else None}
    rows = await gate.engine.json("GET", "/nodes", params)
    return JSONResponse([rules.reduce_node(r) for r in rows or []])


# -- the gate's own operations -----------------------------------------------------------------


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    replicas: int = Field(ge=0, le=10_000)
    version: int = Field(ge=0, le=2**63 - 1)


def _model(call: Call, model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise Refused(400, f"gate: {call.what}: {problems}", "bad-body") from exc


async def replicas(gate: Gate, call: Call) -> Response:
    wanted = _model(call, ReplicaRequest, gate.body_json(call))
    try:
        created = await create_replica(
            gate.engine, gate.scope, wanted, list(gate.settings.allowed_bind_mounts)
        )
    except CloneRefused as exc:
        raise Refused(exc.status, exc.message, exc.kind) from exc
    for cid in (created["Id"], wanted.replaces):
        if cid:
            await _refresh(gate, cid)
    return JSONResponse(created, status_code=201)


async def scale(gate: Gate, call: Call) -> Response:
    wanted = _model(call, ScaleRequest, gate.body_json(call))
    ref = call.match["ref"]
    refused = Refused(404, f"gate: {call.what}: no managed service {ref!r} in {gate.scope}")
    try:
        service = await gate.engine.json("GET", f"/services/{segment(ref)}")
    except EngineError as exc:
        if exc.status == 404:
            raise refused from exc
        raise
    spec = service.get("Spec") or {}
    if not gate.scope.holds(spec.get("Labels")):
        refused.kind = "not-managed"
        raise refused
    current = int((service.get("Version") or {}).get("Index", 0))
    if wanted.version != current:
        raise Refused(
            409,
            f"gate: {call.what}: service {spec.get('Name')} is at version "
            f"{current}, not {wanted.version}: read it again",
        )
    replicated = (spec.get("Mode") or {}).get("Replicated")
    if not isinstance(replicated, dict):
        raise Refused(400, f"gate: {call.what}: service {spec.get('Name')} is not replicated")
    # The spec as stored (no insertDefaults), only the count changed: the task template stays
    # the same, so Swarm replaces no running task (scaler/backends/swarm.py, issue 24).
    replicated["Replicas"] = wanted.replicas
    path = f"/services/{segment(str(service['ID']))}/update"
    status, data = await gate.engine.call("POST", path, {"version": wanted.version}, spec)
    if status >= 400:
        message = message_of(data)
        if "out of sequence" in message:
            raise Refused(409, f"gate: {call.what}: the service changed: {message}")
        raise EngineError(status, message)
    return _passthrough(status, data)


async def snapshot(gate: Gate, call: Call) -> Response:
    kept = gate.snapshot
    if kept is None:  # GATE_SNAPSHOT=0: as a gate without the operation would, for good
        raise Refused(404, f"gate: {call.what}: this gate keeps no snapshot (GATE_SNAPSHOT=0)")
    if not kept.ready:
        raise Refused(
            503,
            f"gate: {call.what}: the snapshot is not ready (starting, or listing again after a "
            "break in the engine's event stream): list the containers",
        )
    return Response(kept.body(), media_type="application/json")


async def status(gate: Gate, call: Call) -> Response:
    return JSONResponse(
        {
            "scope": {"label": gate.scope.key, "value": gate.scope.value},
            "engine": gate.engine.host,
            "api_version": API_VERSION,
            "started": gate.started,
            "refused": dict(gate.counters.refused),
            "refused_total": sum(gate.counters.refused.values()),
            "served": dict(gate.counters.served),
            **({"snapshot": gate.snapshot.state()} if gate.snapshot is not None else {}),
        }
    )


async def openapi_document(gate: Gate, call: Call) -> Response:
    from scaler.gate.openapi import schema  # built from ROUTES below (a module that imports this)

    return JSONResponse(schema(gate.scope.kind))


def _r(
    method: str,
    path: str,
    handler: Handler,
    params: str = "",
    mode: str = "any",
    body: bool = False,
) -> Route:
    pattern = re.compile(path.replace("{ref}", REF))
    name = f"{method} {path}"
    return Route(method, pattern, handler, frozenset(params.split()), mode, name, body)


ROUTES: tuple[Route, ...] = (
    _r("GET", "/_ping", ping),
    _r("HEAD", "/_ping", ping),
    _r("GET", "/version", version),
    _r("GET", "/info", info),
    _r("GET", "/containers/json", list_containers, "all size limit filters trunc_cmd"),
    _r("GET", "/containers/{ref}/json", inspect_container),
    _r("GET", "/containers/{ref}/stats", stats, "stream one-shot"),
    _r("GET", "/events", events, "since until filters"),
    _r("POST", "/containers/{ref}/start", start),
    _r("POST", "/containers/{ref}/stop", stop, "t"),
    _r("POST", "/containers/{ref}/kill", kill, "signal"),
    _r("POST", "/containers/{ref}/wait", wait, "condition"),
    _r("DELETE", "/containers/{ref}", remove, "force v link"),
    _r("GET", "/services", services, "filters status", mode="stack"),
    _r("GET", "/tasks", tasks, "filters", mode="stack"),
    _r("GET", "/nodes", nodes, "filters", mode="stack"),
    _r("POST", "/gate/v1/replicas", replicas, mode="project", body=True),
    _r("POST", "/gate/v1/services/{ref}/scale", scale, mode="stack", body=True),
    _r("GET", "/gate/v1/snapshot", snapshot, mode="project"),
    _r("GET", "/gate/v1/status", status),
    _r("GET", "/gate/v1/openapi.json", openapi_document),
)
