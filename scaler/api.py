"""The scaler's HTTP surface: /metrics, /status, /healthz and the operator's pause/pin controls.

Standard library only (ThreadingHTTPServer in a daemon thread): the surface is four read
endpoints and four small writes, not worth a web framework in the scaler's image.

Reads are open (bind to 127.0.0.1, or publish the port on 127.0.0.1 only). Writes change what the
scaler does to production, so they need ``Authorization: Bearer <SCALER_TOKEN>``; with no token
configured they are disabled (403) rather than open.

    GET  /metrics                      Prometheus text exposition
    GET  /status                       JSON snapshot from the status callable
    GET  /healthz                      200 if the loop cycled within max age, else 503; JSON reason
    GET  /overrides                    JSON: current pauses and pins
    POST /services/<name>/pause        body (optional): {"reason": "...", "by": "..."}
    POST /services/<name>/resume
    POST /services/<name>/pin          body: {"replicas": N, "reason": "...", "by": "..."}
    POST /services/<name>/unpin
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from scaler.control import (
    ConflictError,
    ControlError,
    ControlStore,
    ControlUnavailable,
    Override,
    UnknownServiceError,
)
from scaler.metrics import ScalerMetrics

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9808
MIN_TOKEN_LENGTH = 16
MAX_BODY = 4096
_CONTROL_PATH = re.compile(
    r"^/services/(?P<service>[^/]{1,200})/(?P<action>pause|resume|pin|unpin)$"
)


@dataclass(frozen=True)
class HttpSettings:
    """Where to listen and the control token, from the environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpSettings:
        """SCALER_HTTP_HOST, SCALER_HTTP_PORT, SCALER_TOKEN (empty or unset: control disabled)."""
        env = os.environ if env is None else env
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
        return cls(host=host, port=port, token=token)


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
    ) -> None:
        if not health_max_age_s > 0:
            raise ValueError(f"health_max_age_s must be > 0 seconds, got {health_max_age_s!r}")
        self.metrics = metrics
        self.status = status
        self.control = control
        self.token = token.encode() if token else None
        self.health_max_age_s = health_max_age_s
        self.last_cycle = last_cycle or metrics.last_cycle_monotonic
        self.clock = clock
        self.started_at = clock()
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._httpd = server_class((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: HttpSettings, **kwargs: Any) -> ScalerHTTPServer:
        return cls(host=settings.host, port=settings.port, token=settings.token, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"HTTP server on {self.url} already started")
        self._thread = threading.Thread(
            # A short poll interval so stop() returns promptly (shutdown waits for one poll).
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="scaler-http",
            daemon=True,
        )
        self._thread.start()
        log.info("scaler HTTP on %s (control %s)", self.url, "on" if self.token else "disabled")

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    # -- endpoint logic (plain methods, so the handler stays a thin router) ---------------------

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
        if self.control is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no control store configured"}
        unknown = set(body) - {"replicas", "reason", "by"}
        if unknown:
            return HTTPStatus.BAD_REQUEST, {
                "error": f"unknown field(s) {sorted(unknown)}; expected replicas, reason, by"
            }
        by = body.get("by", who)
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


def _set(override: Override) -> dict[str, Any]:
    return {"ok": True, "override": override.as_json()}


def _json_default(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "celery-scaler"
    timeout = 10  # a client that stalls mid-request does not hold a thread for long

    @property
    def app(self) -> ScalerHTTPServer:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(HTTPStatus.OK, self.app.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._json(*self.app.health())
        elif path == "/status":
            try:
                snapshot = dict(self.app.status())
                payload = json.dumps(snapshot, default=_json_default).encode()
            except Exception as exc:
                log.exception("status snapshot failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"status failed: {exc}"})
                return
            self._send(HTTPStatus.OK, payload, "application/json")
        elif path == "/overrides":
            if self.app.control is None:
                self._json(HTTPStatus.OK, {"overrides": {}})
                return
            try:
                current = self.app.control.overrides()
            except ControlUnavailable as exc:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
                return
            self._json(HTTPStatus.OK, {"overrides": {s: o.as_json() for s, o in current.items()}})
        elif _CONTROL_PATH.match(path):
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "control endpoints need POST"})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {path!r}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        match = _CONTROL_PATH.match(path)
        if match is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no control endpoint {path!r}"})
            return
        refused = self.app.authorize(self.headers.get("Authorization"))
        if refused is not None:
            status, message = refused
            extra = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else {}
            self._json(status, {"error": message}, extra)
            return
        body = self._read_json_body()
        if body is None:
            return
        service = unquote(match["service"])
        who = f"api@{self.client_address[0]}"
        self._json(*self.app.apply(service, match["action"], body, who))

    def _read_json_body(self) -> dict[str, Any] | None:
        """The request's JSON object ({} when empty); None after answering an error."""
        raw_length = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"Content-Length must be in [0, {MAX_BODY}], got {raw_length!r}"},
            )
            return None
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON: {exc}"})
            return None
        if not isinstance(body, dict):
            self._json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"body must be a JSON object, got {type(body).__name__}"},
            )
            return None
        return body

    def _json(
        self,
        status: HTTPStatus,
        payload: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
