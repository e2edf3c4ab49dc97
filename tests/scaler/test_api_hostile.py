"""Hostile clients against the scaler's HTTP server, in raw bytes on real sockets.

Slow-loris (header bytes dribbled, many sockets, one address or many), a slowly sent body, DNS
rebinding (a Host that is not the dashboard's), and the headers that keep the dashboard out of
other pages' frames and scripts. The server is the real uvicorn one, on a loopback port; the
attackers bind other loopback addresses (127.0.0.2, ...) so they are other clients than the
health prober on 127.0.0.1, as a host attacker is another client than the scaler's healthcheck.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from html.parser import HTMLParser
from http import HTTPStatus
from importlib import resources
from typing import Any

import pytest
from scaler_support import ServerFactory
from support.polling import poll_until

from scaler.api import CONTENT_SECURITY_POLICY, HttpSettings, ScalerHTTPServer, host_refusal
from scaler.live import LiveFeed

TOKEN = "hostile-" + "t" * 24
HEAD = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: " + b"a" * 4000

# The loop is always fresh here: /healthz answers 200 (tests/scaler/conftest.py's serve).
SERVE_DEFAULTS = {"last_cycle": time.monotonic}


class SlowLoris:
    """``count`` sockets, each sending the next byte of a never-ending request head every
    ``interval_s``, reconnecting whenever the server closes one (an attacker does not give up).
    Socket i comes from 127.0.0.(2 + i % addresses)."""

    def __init__(
        self, server: ScalerHTTPServer, count: int, interval_s: float, addresses: int = 1
    ) -> None:
        self.target = server.address
        self.count, self.interval_s, self.addresses = count, interval_s, addresses
        self.stop = threading.Event()
        self.connects = 0
        self.closed_on_us = 0
        self.answers: list[bytes] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> SlowLoris:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def connect(self, i: int) -> tuple[socket.socket, int] | None:
        source = (f"127.0.0.{2 + i % self.addresses}", 0)
        try:
            sock = socket.create_connection(self.target, timeout=2, source_address=source)
        except OSError:
            return None
        sock.setblocking(False)
        self.connects += 1
        return sock, 0

    def run(self) -> None:
        conns: list[tuple[socket.socket, int] | None] = [self.connect(i) for i in range(self.count)]
        while not self.stop.wait(self.interval_s):
            for i, conn in enumerate(conns):
                if conn is None:
                    conns[i] = self.connect(i)
                    continue
                sock, sent = conn
                try:
                    answer = sock.recv(4096)
                except BlockingIOError:
                    answer = None
                except OSError:
                    answer = b""
                if answer is not None:  # the server answered or closed: start over
                    if answer:
                        self.answers.append(answer)
                    self.closed_on_us += 1
                    sock.close()
                    conns[i] = self.connect(i)
                    continue
                try:
                    sock.send(HEAD[sent % len(HEAD) : sent % len(HEAD) + 1])
                    conns[i] = (sock, sent + 1)
                except OSError:
                    self.closed_on_us += 1
                    sock.close()
                    conns[i] = self.connect(i)
        for conn in conns:
            if conn is not None:
                conn[0].close()


def healthz(server: ScalerHTTPServer) -> int | None:
    """/healthz's status from 127.0.0.1, or None when no answer came within 2 s."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def open_by_client(server: ScalerHTTPServer) -> Counter[str]:
    # list() copies the guard's dict in one step under the GIL; the event loop may add to it.
    return Counter(conn.peer for conn in list(server.guard.open))


def test_slow_loris_from_one_address_holds_only_its_share_and_healthz_answers(
    serve: ServerFactory,
) -> None:
    """The issue's attack: 70 connections dribbling header bytes. Before, /healthz was 503 for as
    long as it ran; now the attacker keeps at most its per-client share open."""
    server = serve(limit_concurrency=64, limit_per_client=16)
    with SlowLoris(server, count=70, interval_s=0.3) as attack:
        poll_until(lambda: attack.connects >= 70, "the attacker to open 70 connections", 10)
        poll_until(lambda: open_by_client(server)["127.0.0.2"] == 16, "16 attacker connections")
        assert poll_until(lambda: healthz(server) == 200, "/healthz 200 during the attack", 10)
        # Not a lucky probe: every one during the attack is answered.
        assert [healthz(server) for _ in range(10)] == [200] * 10
        assert open_by_client(server)["127.0.0.2"] <= 16
        poll_until(lambda: attack.closed_on_us >= 70 - 16, "the connections past the share closed")


def test_slow_loris_from_many_addresses_is_displaced_and_healthz_answers(
    serve: ServerFactory,
) -> None:
    """70 clients of one connection each fill the global cap (64); a new connection displaces the
    oldest one still sending its request, so /healthz is answered without waiting for a timeout."""
    server = serve(limit_concurrency=64, limit_per_client=16, read_timeout_s=60)
    with SlowLoris(server, count=70, interval_s=0.3, addresses=70) as attack:
        poll_until(lambda: attack.connects >= 70, "the attacker to open 70 connections", 10)
        poll_until(lambda: len(server.guard.open) == 64, "the global cap filled")
        assert poll_until(lambda: healthz(server) == 200, "/healthz 200 during the attack", 10)
        assert [healthz(server) for _ in range(10)] == [200] * 10
        assert server.guard.counts["timed_out"] == 0, "displaced, not timed out"
        assert server.guard.counts["displaced"] >= 6


def test_a_request_head_dribbled_past_the_read_timeout_gets_408_and_is_closed(
    serve: ServerFactory,
) -> None:
    """Bytes keep arriving (uvicorn's keep-alive timer stops at the first one), yet the request
    must be whole within read_timeout_s of the connection's start."""
    server = serve(read_timeout_s=1, idle_timeout_s=1)
    with SlowLoris(server, count=3, interval_s=0.1) as attack:
        poll_until(lambda: attack.answers, "the server to answer the dribbling clients", 15)
    assert attack.answers[0].startswith(b"HTTP/1.1 408"), attack.answers[0][:80]
    body = attack.answers[0].partition(b"\r\n\r\n")[2]
    assert "not received within 1 s" in json.loads(body)["error"]
    assert server.guard.counts["timed_out"] >= 1
    assert healthz(server) == 200


def test_a_body_dribbled_past_the_read_timeout_gets_408_and_nothing_is_applied(
    serve: ServerFactory,
) -> None:
    applied: list[Any] = []

    def apply(*args: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        applied.append(args)
        return HTTPStatus.OK, {"ok": True}

    server = serve(read_timeout_s=1)
    server.apply = apply  # type: ignore[method-assign,assignment]
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"POST /services/default/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Length: 200\r\n\r\n{"
        )
        reply = b""
        sock.settimeout(0.2)
        for _ in range(150):  # one body byte every 0.2 s until the server gives up on us
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                sock.sendall(b" ")
                continue
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert applied == []
    assert server.guard.counts["timed_out"] == 1


def test_a_keep_alive_connection_gets_a_fresh_read_deadline_per_request(
    serve: ServerFactory,
) -> None:
    """The deadline bounds each request's arrival, not the connection's life."""
    server = serve(read_timeout_s=1, idle_timeout_s=5)
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 2.5:  # well past one read_timeout_s
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            answered += 1
            time.sleep(0.3)  # the client's own pace between requests, not a synchronisation
        assert answered >= 5
        assert server.guard.counts["timed_out"] == 0
    finally:
        conn.close()


# -- DNS rebinding: the Host header ----------------------------------------------------------


def raw(server: ScalerHTTPServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "host_lines",
    [
        b"Host: evil.example\r\n",
        b"Host: evil.example:9808\r\n",
        b"Host: 127.0.0.1.evil.example\r\n",
        b"Host: localhost.evil.example\r\n",
        b"Host: 2130706433\r\n",  # a name, not an address (only the dotted forms are)
        b"Host: 127.0.0.1\r\nHost: evil.example\r\n",
        b"Host: 127.0.0.1:x\r\n",
        b"Host: [::1\r\n",
    ],
)
def test_a_host_that_is_not_the_dashboards_is_refused_before_any_endpoint(
    serve: ServerFactory, host_lines: bytes
) -> None:
    reads: list[int] = []

    def snapshot() -> dict[str, str]:
        reads.append(1)
        return {"secret": "snapshot"}

    server = serve(status=snapshot, live=LiveFeed())
    for path in (b"/status", b"/api/live", b"/events", b"/"):
        status, _, body = raw(
            server, b"GET " + path + b" HTTP/1.1\r\n" + host_lines + b"Connection: close\r\n\r\n"
        )
        if b"\r\nHost" in host_lines:
            # h11 itself may refuse a duplicate Host (400); either way, never served.
            assert status in (400, 421), (path, status, body)
        else:
            assert status == 421, (path, status, body)
            error = json.loads(body)["error"]
            assert "Host" in error and ("DNS rebinding" in error or "not a host name" in error)
        assert b"snapshot" not in body
    status, _, body = raw(
        server,
        b"POST /services/default/pause HTTP/1.1\r\n"
        + host_lines
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert status in (400, 421), body
    assert reads == [], "the status callable was never reached"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST.:{port}",
        "[::1]:{port}",
        "10.1.2.3:9808",  # any IP address: a page can send it only from that very origin
        "dashboard.internal:{port}",  # SCALER_HTTP_ALLOWED_HOSTS
    ],
)
def test_ip_addresses_localhost_and_the_configured_names_are_served(
    serve: ServerFactory, host: str
) -> None:
    server = serve(allowed_hosts=("dashboard.internal",))
    value = host.format(port=server.address[1]).encode()
    status, _, body = raw(
        server, b"GET /status HTTP/1.1\r\nHost: " + value + b"\r\nConnection: close\r\n\r\n"
    )
    assert status == 200, body
    assert json.loads(body) == {"cycle": 7}


def test_a_request_without_host_is_served_as_no_browser_sends_one(serve: ServerFactory) -> None:
    status, _, body = raw(serve(), b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200, body


def test_host_refusal_names_the_reason() -> None:
    allowed = frozenset({"localhost"})
    assert host_refusal([], allowed) is None
    assert host_refusal([b"[fe80::1]:1"], allowed) is None
    assert "more than one Host" in (host_refusal([b"a", b"b"], allowed) or "")
    assert "DNS rebinding" in (host_refusal([b"evil.example"], allowed) or "")
    assert "not a host name" in (host_refusal([b"evil example"], allowed) or "")
    assert "not a host name" in (host_refusal([b"::1"], allowed) or "")  # v6 needs brackets


def test_allowed_hosts_from_the_environment() -> None:
    got = HttpSettings.from_env({"SCALER_HTTP_ALLOWED_HOSTS": " Scaler.Example. , ops-box "})
    assert got.allowed_hosts == ("scaler.example", "ops-box")
    assert HttpSettings.from_env({}).allowed_hosts == ()
    for bad in ("*.example", "host:9808", "http://host", "a b"):
        with pytest.raises(ValueError, match="SCALER_HTTP_ALLOWED_HOSTS"):
            HttpSettings.from_env({"SCALER_HTTP_ALLOWED_HOSTS": bad})


# -- the dashboard's Content-Security-Policy -------------------------------------------------


def test_every_response_carries_the_csp_and_refuses_framing(serve: ServerFactory) -> None:
    server = serve(live=LiveFeed())
    for path in (b"/", b"/static/app.js", b"/status", b"/healthz", b"/nothing"):
        _, headers, _ = raw(
            server, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        csp = headers.get("content-security-policy", "")
        directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
        assert directives.get("frame-ancestors") == ["'none'"], (path, csp)
        assert directives.get("script-src") == ["'self'"], (path, csp)
        assert directives.get("style-src") == ["'self'"], (path, csp)
        assert directives.get("default-src") == ["'none'"], (path, csp)
        assert "unsafe" not in csp
        assert headers.get("x-frame-options") == "DENY", path
        assert headers.get("x-content-type-options") == "nosniff", path
    _, headers, _ = raw(
        server, b"GET /status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    assert headers.get("content-security-policy") == CONTENT_SECURITY_POLICY, "refusals too"


class _InlineFinder(HTMLParser):
    """Everything in a page the CSP above would block: inline scripts and styles, style and
    event-handler attributes, javascript: URLs, and resources from another origin."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.blocked.append(f"<{tag} {name}=...>")
            if name in ("src", "href") and value and ("//" in value or "javascript:" in value):
                self.blocked.append(f"<{tag} {name}={value}>")
        if tag == "style":
            self.blocked.append("<style> element")
        self._in = tag if tag == "script" else None

    def handle_data(self, data: str) -> None:
        if self._in == "script" and data.strip():
            self.blocked.append(f"inline script: {data.strip()[:40]}")

    def handle_endtag(self, tag: str) -> None:
        self._in = None


def test_the_dashboard_page_needs_nothing_the_csp_blocks() -> None:
    page = resources.files("scaler.dashboard").joinpath("index.html").read_text()
    finder = _InlineFinder()
    finder.feed(page)
    assert finder.blocked == []
    assert "<script src=" in page, "the parser saw the page's scripts"
