"""The scaler's HTTP surface: the dashboard, /metrics, /status, /healthz, the operator's controls.

FastAPI (on Starlette) served by uvicorn, in a thread of the scaler's process beside the loop. A
maintained server gives what a hand-written one got wrong under hostile requests: chunked bodies
are read, every malformed request gets a 4xx with a message, one event loop serves every
connection (no thread per connection), and the schema at /openapi.json says what each endpoint
takes, so the tests fuzz the API against it.

Reads are open (bind to 127.0.0.1, or publish the port on 127.0.0.1 only). Writes change what the
scaler does to production, so they need ``Authorization: Bearer <SCALER_TOKEN>``; with no token
configured they are disabled (403) rather than open.

    GET  /                             the live dashboard (HTML; data from /events)
    GET  /events                       server-sent events: the dashboard's history, then each cycle
    GET  /api/live                     the same history as one JSON document
    GET  /metrics                      Prometheus text exposition
    GET  /status                       JSON snapshot from the status callable
    GET  /healthz                      200 if the loop cycled within max age, else 503; JSON reason
    GET  /overrides                    JSON: current pauses and pins
    GET  /openapi.json                 the OpenAPI schema of all of the above
    POST /services/<name>/pause        body (optional): {"reason": "...", "by": "..."}
    POST /services/<name>/resume
    POST /services/<name>/pin          body: {"replicas": N, "reason": "...", "by": "..."}
    POST /services/<name>/unpin

Bounds: a request body of at most ``MAX_BODY`` bytes (413 past it, chunked or not), at most
``max_streams`` dashboards streaming at once (503 past it), idle connections closed after
``idle_timeout_s``. Slow clients (slow-loris) cannot hold the server: each request, its head and
its body, must arrive within ``read_timeout_s`` of the connection's start or of the previous
response (408 and closed otherwise, however steadily the bytes trickle in); at most
``limit_per_client`` connections from one address and ``limit_concurrency`` in all are open. A
connection past either cap displaces the oldest connection of that client (or of all) that has not
yet sent a whole request; only when every one is in the middle of a request is it answered 503.
So a client that dribbles header bytes holds at most its own share, never /healthz. (Those limits
are scaler/http_limits.py's, which the engine gate's server uses too.)

Browsers: a request whose ``Host`` is neither an IP address, ``localhost`` nor a name in
``allowed_hosts`` (SCALER_HTTP_ALLOWED_HOSTS) is refused with 421 before any endpoint sees it, so
a web page cannot reach the API through DNS rebinding (its own name pointed at 127.0.0.1). Every
response carries a Content-Security-Policy (scripts, styles and connections from this origin only,
``frame-ancestors 'none'``), X-Frame-Options: DENY and X-Content-Type-Options: nosniff.
The audit trail's ``by`` always carries the caller's address as the socket saw it
(``api@<address>``); a ``by`` in the body is kept beside it as the name the caller gave, never
instead of it, and proxy headers (X-Forwarded-For) are ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scaler.control import (
    MAX_TEXT,
    ConflictError,
    ControlError,
    ControlStore,
    ControlUnavailable,
    Override,
    UnknownServiceError,
)
from scaler.http_limits import ConnectionGuard, guarded_protocol
from scaler.live import LiveFeed
from scaler.metrics import ScalerMetrics
from scaler.secret_files import with_file_variables

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9808
MIN_TOKEN_LENGTH = 16
MAX_BODY = 4096
MAX_CLAIMED_BY = 100  # the name a caller gives; the stored `by` adds its address
MAX_SERVICE_NAME = 200
DEFAULT_LIMIT_CONCURRENCY = 64
DEFAULT_MAX_STREAMS = 16
DEFAULT_IDLE_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_LIMIT_PER_CLIENT = 16
# The names a browser may use for the dashboard besides IP addresses (SCALER_HTTP_ALLOWED_HOSTS
# adds more). An IP address is always accepted: DNS rebinding needs a name the attacker owns.
LOCAL_HOST_NAMES = ("localhost",)
_HOST_NAME_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*)(?:\.[a-z0-9_-]+)*$")
# What the dashboard needs and nothing more: its own scripts, styles and /events, no inline code,
# no framing (clickjacking of the pause/pin buttons), the favicon as a data: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
STREAM_KEEPALIVE_S = 15.0
DASHBOARD_PACKAGE = "scaler.dashboard"
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class HttpSettings:
    """Where to listen, the control token and the extra Host names, from the environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpSettings:
        """SCALER_HTTP_HOST, SCALER_HTTP_PORT, SCALER_TOKEN (empty or unset: control disabled;
        or SCALER_TOKEN_FILE, a Swarm secret's path), SCALER_HTTP_ALLOWED_HOSTS (host names,
        comma-separated, accepted in ``Host`` besides IP addresses and localhost). Raises
        ValueError naming a bad one."""
        env = with_file_variables(os.environ if env is None else env, ("SCALER_TOKEN",))
        host = env.get("SCALER_HTTP_HOST", "").strip() or DEFAULT_HOST
        raw_port = env.get("SCALER_HTTP_PORT", "").strip() or str(DEFAULT_PORT)
        try:
            port = int(raw_port)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise ValueError(
                f"SCALER_HTTP_PORT must be an integer port in [0, 65535], got {raw_port!r}"
            )
        token = env.get("SCALER_TOKEN", "").strip() or None
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"SCALER_TOKEN is set but is {len(token)} characters long; expected at least "
                f"{MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`), or unset it to disable control"
            )
        if token is not None and not token.isascii():
            raise ValueError("SCALER_TOKEN must be ASCII (e.g. `openssl rand -hex 32`)")
        raw_hosts = env.get("SCALER_HTTP_ALLOWED_HOSTS", "")
        allowed = tuple(h.strip().lower().rstrip(".") for h in raw_hosts.split(",") if h.strip())
        for name in allowed:
            if not _is_host_name(name):
                raise ValueError(
                    "SCALER_HTTP_ALLOWED_HOSTS must be host names separated by commas (no "
                    f"ports, no wildcards), got {name!r}"
                )
        return cls(host=host, port=port, token=token, allowed_hosts=allowed)


def _is_host_name(name: str) -> bool:
    return len(name) <= 253 and _HOST_NAME_RE.match(name) is not None


class BadRequest(Exception):
    """A request the API refuses: the status and the message for the caller."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _BrowserGuard:
    """ASGI middleware: refuses a request whose Host is not the dashboard's own (421, before any
    endpoint sees it) and adds the security headers to every response."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        hosts = [value for name, value in scope["headers"] if name == b"host"]
        refusal = host_refusal(hosts, self.allowed_hosts)
        if refusal is not None:
            await _error(421, refusal)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def host_refusal(values: list[bytes], allowed: frozenset[str]) -> str | None:
    """Why a request with these Host header values is refused, or None when it is served.

    Served: no Host (HTTP/1.0; a browser always sends one), an IP address (a page can only send
    that as Host when its own origin is that address), localhost, or a name in ``allowed``.
    Refused: any other name, as a page gets when it points its own name at the scaler (DNS
    rebinding), more than one Host, and a malformed one."""
    if not values:
        return None
    if len(values) > 1:
        return "more than one Host header"
    raw = values[0].decode("latin-1")
    name = _host_name(raw)
    if name is None:
        return f"Host {raw[:100]!r} is not a host name or an address with an optional port"
    if name in allowed:
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return (
            f"Host {raw[:100]!r} is not this scaler's name (a DNS rebinding guard): use an IP "
            "address, localhost, or add the name to SCALER_HTTP_ALLOWED_HOSTS"
        )
    return None


def _host_name(raw: str) -> str | None:
    """The name or address in a Host value (lowercase, no port, no brackets), None if malformed."""
    host = raw.strip().lower()
    if host.startswith("["):
        address, sep, port = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return None
        return address if sep and re.fullmatch(r"(:[0-9]{1,5})?", port) else None
    name, sep, port = host.partition(":")
    if sep and not re.fullmatch(r"[0-9]{1,5}", port):
        return None
    name = name[:-1] if name.endswith(".") else name
    return name if _is_host_name(name) else None


class ScalerHTTPServer:
    """Serves the endpoints above from a daemon thread. ``port=0`` picks a free port (tests)."""

    def __init__(
        self,
        *,
        metrics: ScalerMetrics,
        status: Callable[[], Mapping[str, Any]],
        control: ControlStore | None,
        token: str | None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        health_max_age_s: float = 30.0,
        last_cycle: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        live: LiveFeed | None = None,
        limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY,
        max_streams: int = DEFAULT_MAX_STREAMS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_body: int = MAX_BODY,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        limit_per_client: int | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        if not health_max_age_s > 0:
            raise ValueError(f"health_max_age_s must be > 0 seconds, got {health_max_age_s!r}")
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0 seconds, got {read_timeout_s!r}")
        if limit_concurrency < 2 or max_streams < 1 or max_streams >= limit_concurrency:
            raise ValueError(
                "limit_concurrency must be >= 2 and max_streams in [1, limit_concurrency); got "
                f"{limit_concurrency!r} and {max_streams!r}"
            )
        if limit_per_client is None:
            limit_per_client = min(DEFAULT_LIMIT_PER_CLIENT, limit_concurrency)
        if not 1 <= limit_per_client <= limit_concurrency:
            raise ValueError(
                f"limit_per_client must be in [1, limit_concurrency]; got {limit_per_client!r}"
            )
        self.metrics = metrics
        self.status = status
        self.control = control
        self.token = token.encode() if token else None
        self.health_max_age_s = health_max_age_s
        self.last_cycle = last_cycle or metrics.last_cycle_monotonic
        self.clock = clock
        self.started_at = clock()
        self.live = live
        self.max_streams = max_streams
        self.max_body = max_body
        self._streams = 0
        self._streams_lock = threading.Lock()
        self._stopping = threading.Event()
        self.app = build_app(self)
        # Host names accepted besides IP addresses: localhost, the configured ones, and the
        # listening host when it is a name.
        bind_name = _host_name(host)
        self.allowed_hosts = frozenset(
            {*LOCAL_HOST_NAMES, *allowed_hosts, *([bind_name] if bind_name else [])}
        )
        self.guard = ConnectionGuard(
            read_timeout_s, limit_concurrency, limit_per_client, logger=log
        )
        # Bound here, so a taken port fails in the constructor (the CLI says which) and port 0
        # has its number before the server starts.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self._config = uvicorn.Config(
            _BrowserGuard(self.app, self.allowed_hosts),
            http=guarded_protocol(self.guard),
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,  # the scaler's JSON logging stays as it is
            access_log=False,
            proxy_headers=False,  # the audit trail's address is the socket's, never a header's
            server_header=False,
            limit_concurrency=None,  # the guard's caps (uvicorn's would count slow readers too)
            timeout_keep_alive=max(1, round(idle_timeout_s)),
            timeout_graceful_shutdown=2,
            h11_max_incomplete_event_size=16 * 1024,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: HttpSettings, **kwargs: Any) -> ScalerHTTPServer:
        return cls(
            host=settings.host,
            port=settings.port,
            token=settings.token,
            allowed_hosts=settings.allowed_hosts,
            **kwargs,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"HTTP server on {self.url} already started")
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="scaler-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.url} did not start within 10 s")
            time.sleep(0.01)
        log.info("scaler HTTP on %s (control %s)", self.url, "on" if self.token else "disabled")

    def stop(self) -> None:
        self._stopping.set()  # ends the event streams, which would hold the shutdown
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None
        self._socket.close()

    # -- endpoint logic (plain methods; the routes below stay thin) ------------------------------

    def health(self) -> tuple[HTTPStatus, dict[str, Any]]:
        now = self.clock()
        last = self.last_cycle()
        if last is None:
            since = now - self.started_at
            return HTTPStatus.SERVICE_UNAVAILABLE, {
                "ok": False,
                "reason": f"no cycle yet since the server started {since:.1f} s ago",
                "max_age_s": self.health_max_age_s,
            }
        age = now - last
        if age > self.health_max_age_s:
            return HTTPStatus.SERVICE_UNAVAILABLE, {
                "ok": False,
                "reason": f"last cycle {age:.1f} s ago, more than {self.health_max_age_s} s",
                "last_cycle_age_s": round(age, 3),
                "max_age_s": self.health_max_age_s,
            }
        return HTTPStatus.OK, {
            "ok": True,
            "reason": f"last cycle {age:.1f} s ago",
            "last_cycle_age_s": round(age, 3),
            "max_age_s": self.health_max_age_s,
        }

    def authorize(self, header: str | None) -> tuple[HTTPStatus, str] | None:
        """None when allowed; otherwise the status and why."""
        if self.token is None:
            return HTTPStatus.FORBIDDEN, (
                "control is disabled: no SCALER_TOKEN is configured in the scaler's environment"
            )
        scheme, _, credential = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return HTTPStatus.UNAUTHORIZED, "missing 'Authorization: Bearer <token>' header"
        if not hmac.compare_digest(credential.strip().encode(), self.token):
            return HTTPStatus.UNAUTHORIZED, "wrong token"
        return None

    def apply(
        self, service: str, action: str, body: Mapping[str, Any], who: str
    ) -> tuple[HTTPStatus, dict[str, Any]]:
        """Apply one control request. ``who`` is the caller as the socket saw it
        (``api@<address>``); a ``by`` in the body is recorded beside it, never instead."""
        if self.control is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no control store configured"}
        unknown = set(body) - {"replicas", "reason", "by"}
        if unknown:
            return HTTPStatus.BAD_REQUEST, {
                "error": f"unknown field(s) {sorted(unknown)}; expected replicas, reason, by"
            }
        claimed = body.get("by")
        if claimed is not None and (
            not isinstance(claimed, str) or not claimed.strip() or len(claimed) > MAX_CLAIMED_BY
        ):
            return HTTPStatus.BAD_REQUEST, {
                "error": f"by must be a non-empty string of at most {MAX_CLAIMED_BY} characters "
                f"(who you are; your address is recorded beside it), got {claimed!r:.120}"
            }
        by = f"{claimed.strip()} via {who}" if claimed else who
        reason = body.get("reason", "")
        try:
            if action == "pause":
                return HTTPStatus.OK, _set(self.control.pause(service, by=by, reason=reason))
            if action == "pin":
                if "replicas" not in body:
                    return HTTPStatus.BAD_REQUEST, {
                        "error": 'pin needs a JSON body {"replicas": N}; field replicas missing'
                    }
                replicas = body["replicas"]
                return HTTPStatus.OK, _set(
                    self.control.pin(service, replicas, by=by, reason=reason)
                )
            removed = (
                self.control.resume(service) if action == "resume" else self.control.unpin(service)
            )
            return HTTPStatus.OK, {
                "ok": True,
                "removed": None if removed is None else removed.as_json(),
            }
        except UnknownServiceError as exc:
            return HTTPStatus.NOT_FOUND, {"error": str(exc)}
        except ConflictError as exc:
            return HTTPStatus.CONFLICT, {"error": str(exc)}
        except ControlError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except ControlUnavailable as exc:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}

    async def read_json_body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object ({} when empty), read to at most ``max_body`` bytes whether
        it comes with a Content-Length or chunked; BadRequest otherwise."""
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                raise BadRequest(
                    HTTPStatus.BAD_REQUEST,
                    f"Content-Length must be an integer >= 0, got {declared!r}",
                )
            if length > self.max_body:
                raise _too_large(self.max_body)
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > self.max_body:
                    raise _too_large(self.max_body)
        except ClientDisconnect:
            # Gone, or closed at the read deadline: nobody reads this answer, but no traceback.
            raise BadRequest(HTTPStatus.REQUEST_TIMEOUT, "request body not received") from None
        if not raw.strip():
            return {}
        try:
            body = json.loads(bytes(raw).decode("utf-8"))
        except RecursionError:
            raise BadRequest(
                HTTPStatus.BAD_REQUEST, "body is not valid JSON: nested too deeply"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest(
                HTTPStatus.BAD_REQUEST, f"body must be a JSON object, got {type(body).__name__}"
            )
        return body

    def open_stream(self) -> bool:
        """Count one more event stream; False when ``max_streams`` are open already."""
        with self._streams_lock:
            if self._streams >= self.max_streams:
                return False
            self._streams += 1
            return True

    def close_stream(self) -> None:
        with self._streams_lock:
            self._streams -= 1

    async def stream(self, request: Request) -> AsyncIterator[bytes]:
        """The dashboard's server-sent events: ``init`` with the history, then ``update`` after
        every cycle (new points, new events, the latest status); a comment every
        STREAM_KEEPALIVE_S so proxies keep the connection."""
        assert self.live is not None
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        unsubscribe = self.live.subscribe(lambda: loop.call_soon_threadsafe(wake.set))
        try:
            view = self.live.view()
            view["control"] = self.token is not None
            yield _sse("init", view)
            point_seq, event_seq = view["point_seq"], view["event_seq"]
            quiet = 0.0
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(wake.wait(), timeout=1.0)
                except TimeoutError:
                    quiet += 1.0
                    if await request.is_disconnected():
                        return
                    if quiet >= STREAM_KEEPALIVE_S:
                        quiet = 0.0
                        yield b": keep-alive\n\n"
                    continue
                wake.clear()
                quiet = 0.0
                update = self.live.since(point_seq, event_seq)
                point_seq, event_seq = update["point_seq"], update["event_seq"]
                yield _sse("update", update)
        finally:
            unsubscribe()
            self.close_stream()


def _too_large(limit: int) -> BadRequest:
    return BadRequest(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body larger than {limit} bytes"
    )


def _set(override: Override) -> dict[str, Any]:
    return {"ok": True, "override": override.as_json()}


def _json_default(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    payload = json.dumps(data, default=_json_default, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_no_store(headers))


def _no_store(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"Cache-Control": "no-store", **(headers or {})}


# -- the OpenAPI description of the bodies and answers (validation is done by hand, above and in
# scaler.control, so the messages name the field, the value and what was expected) ---------------

_ERROR = {
    "description": "Refused; the message says why",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    },
}
_JSON_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
_TEXT_FIELDS = {
    "reason": {"type": "string", "maxLength": MAX_TEXT, "description": "why (shown in status)"},
    "by": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_CLAIMED_BY,
        "pattern": r"\S",
        "description": "who you are; recorded as '<by> via api@<your address>'",
    },
}
_BODIES: dict[str, dict[str, Any]] = {
    "pause": {"type": "object", "properties": _TEXT_FIELDS, "additionalProperties": False},
    "pin": {
        "type": "object",
        "properties": {
            "replicas": {"type": "integer", "minimum": 0, "description": "0..max_replicas"},
            **_TEXT_FIELDS,
        },
        "required": ["replicas"],
        "additionalProperties": False,
    },
    "resume": {"type": "object", "properties": {}, "additionalProperties": False},
    "unpin": {"type": "object", "properties": {}, "additionalProperties": False},
}
_CONTROL_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "Applied", **_JSON_OBJECT},
    400: _ERROR,
    401: _ERROR,
    403: _ERROR,
    404: _ERROR,
    409: _ERROR,
    413: _ERROR,
    503: _ERROR,
}


def build_app(server: ScalerHTTPServer) -> FastAPI:
    """The ASGI application serving ``server``'s endpoints."""
    app = FastAPI(
        title="Celery scaler",
        version="1",
        description="The autoscaler's status, metrics, health and operator controls.",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: not in a self-contained sidecar
        redoc_url=None,
        openapi_url="/openapi.json",
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == HTTPStatus.NOT_FOUND:
            return _error(404, f"no endpoint {request.url.path!r}")
        if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            return _error(405, f"{request.method} not allowed on {request.url.path!r}", exc.headers)
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(BadRequest)
    async def refused(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(_asset("index.html"), headers=_no_store())

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            return _error(404, f"no endpoint '/static/{name}'")
        return Response(
            _asset(name),
            media_type=STATIC_FILES[name],
            headers={"Cache-Control": "max-age=300"},
        )

    @app.get(
        "/events",
        summary="The dashboard's live feed (server-sent events)",
        responses={
            200: {
                "description": "`init` (history, events, status), then `update` after each cycle",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            503: _ERROR,
        },
    )
    async def events(request: Request) -> Response:
        if server.live is None:
            return _error(503, "no live feed in this scaler process")
        if not server.open_stream():
            return _error(
                503, f"{server.max_streams} dashboards are streaming already; try again later"
            )
        return StreamingResponse(
            server.stream(request),
            media_type="text/event-stream",
            headers=_no_store({"X-Accel-Buffering": "no"}),
        )

    @app.get(
        "/api/live",
        summary="The dashboard's history as one document",
        responses={200: {"description": "points, events, status", **_JSON_OBJECT}, 503: _ERROR},
    )
    def live() -> Response:
        if server.live is None:
            return _error(503, "no live feed in this scaler process")
        view = server.live.view()
        view["control"] = server.token is not None
        return _json(HTTPStatus.OK, view)

    @app.get(
        "/metrics",
        summary="Prometheus text exposition",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        response_class=Response,
    )
    def metrics() -> Response:
        return Response(
            server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST, headers=_no_store()
        )

    @app.get("/healthz", summary="200 while the loop cycles, 503 otherwise",
             responses={200: _JSON_OBJECT, 503: _JSON_OBJECT})  # fmt: skip
    def healthz() -> Response:
        return _json(*server.health())

    @app.get("/status", summary="The last cycle's snapshot",
             responses={200: _JSON_OBJECT, 500: _ERROR})  # fmt: skip
    def status() -> Response:
        try:
            snapshot = dict(server.status())
            payload = json.dumps(snapshot, default=_json_default).encode()
        except Exception as exc:
            log.exception("status snapshot failed")
            return _error(500, f"status failed: {exc}")
        return Response(payload, media_type="application/json", headers=_no_store())

    @app.get("/overrides", summary="The pauses and pins in force",
             responses={200: _JSON_OBJECT, 503: _ERROR})  # fmt: skip
    def overrides() -> Response:
        if server.control is None:
            return _json(HTTPStatus.OK, {"overrides": {}})
        try:
            current = server.control.overrides()
        except ControlUnavailable as exc:
            return _error(503, str(exc))
        return _json(HTTPStatus.OK, {"overrides": {s: o.as_json() for s, o in current.items()}})

    def control_route(action: str, summary: str) -> None:
        async def handler(request: Request, service: str) -> Response:
            refused = server.authorize(request.headers.get("authorization"))
            if refused is not None:
                code, message = refused
                extra = {"WWW-Authenticate": "Bearer"} if code == HTTPStatus.UNAUTHORIZED else {}
                return _error(code, message, extra)
            if len(service) > MAX_SERVICE_NAME:
                return _error(404, f"service name longer than {MAX_SERVICE_NAME} characters")
            body = await server.read_json_body(request)
            client = request.client.host if request.client else "unknown"
            # Redis calls block: a worker thread of the server's bounded pool, not the event loop.
            code, reply = await run_in_threadpool(
                server.apply, service, action, body, f"api@{client}"
            )
            return _json(code, reply)

        handler.__name__ = f"{action}_service"
        app.add_api_route(
            f"/services/{{service}}/{action}",
            handler,
            methods=["POST"],
            summary=summary,
            responses=_CONTROL_ANSWERS,
            openapi_extra={
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": action == "pin",
                    "content": {"application/json": {"schema": _BODIES[action]}},
                },
            },
        )

    control_route("pause", "Hold the service at its current count (token)")
    control_route("resume", "Undo a pause (token)")
    control_route("pin", "Hold the service at exactly N replicas (token)")
    control_route("unpin", "Undo a pin (token)")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "SCALER_TOKEN"}
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _json(status: HTTPStatus | int, payload: Mapping[str, Any]) -> Response:
    return Response(
        json.dumps(payload, default=_json_default).encode(),
        status_code=int(status),
        media_type="application/json",
        headers=_no_store(),
    )


def _asset(name: str) -> bytes:
    return resources.files(DASHBOARD_PACKAGE).joinpath(name).read_bytes()
