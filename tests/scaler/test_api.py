"""The scaler's HTTP surface on a real socket, its metrics, and the pause/pin store (real Redis)."""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from scaler_support import ServerFactory
from support.polling import poll_until

from scaler.api import HttpSettings, ScalerHTTPServer
from scaler.control import ConflictError, ControlError, ControlStore, UnknownServiceError
from scaler.decide import Decision
from scaler.live import LiveFeed
from scaler.metrics import DecisionRecord, ScalerMetrics, error_source, reason_kind
from scaler.observations import Observations, QueueSignal, Resources, ServiceObservation

TOKEN = "s3cret-" + "x" * 24
LIMITS = {"default": 4, "cpu_intensive": 2}


class Clock:
    """A clock the test moves by hand, so "the loop has not cycled for a while" needs no sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=2)
    yield c
    c.close()


@pytest.fixture
def store(rclient: redis.Redis, key_prefix: str) -> Iterator[ControlStore]:
    limits = dict(LIMITS)
    s = ControlStore(rclient, lambda: limits, prefix=f"{key_prefix}{uuid.uuid4().hex[:6]}:")
    s.test_limits = limits  # type: ignore[attr-defined]  # mutable, to simulate a policy reload
    yield s
    rclient.delete(s.key)


def call(
    server: ScalerHTTPServer,
    method: str,
    path: str,
    body: object = None,
    token: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    """One request; returns status, headers and the JSON body (or text for /metrics)."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read().decode()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        parsed = json.loads(data) if "json" in hdrs.get("content-type", "") else data
        return resp.status, hdrs, parsed
    finally:
        conn.close()


def observations() -> Observations:
    at = 1_700_000_000.0
    return Observations(
        at=at,
        services={
            "default": ServiceObservation(
                service="default",
                replicas=2,
                queues={
                    "default": QueueSignal("default", 7, 2, 3.5, at),
                    # The broker could not be read for this one: missing, not zero.
                    "default_low": QueueSignal("default_low", None, None, None, at),
                },
                workers=Resources(40.0, 30.0, at),
            ),
            "cpu_intensive": ServiceObservation(
                service="cpu_intensive",
                replicas=1,
                queues={"cpu_intensive": QueueSignal("cpu_intensive", 0, 0, None, at)},
                workers=Resources(None, None, at),
            ),
        },
        host=Resources(55.0, 60.0, at),
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_as_prometheus_exposition_with_the_expected_families(
    serve: ServerFactory,
) -> None:
    metrics = ScalerMetrics()
    server = serve(metrics=metrics)
    decisions = [
        Decision("default", 2, 3, "up", ("work 9 (waiting 7, in flight 2) / target 3 -> 3",)),
        Decision("cpu_intensive", 1, 1, "hold", ("paused by operator (ops): holding",)),
    ]
    metrics.record_cycle(
        observations=observations(),
        decisions=decisions,
        duration_s=0.042,
        leader=True,
        errors=["broker: depth of default_low unreadable"],
        overrides={"cpu_intensive": "pause"},
    )
    status, headers, text = call(server, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "scaler_queue_depth": "gauge",
        "scaler_queue_oldest_age_seconds": "gauge",
        "scaler_queue_in_flight": "gauge",
        "scaler_replicas_current": "gauge",
        "scaler_replicas_desired": "gauge",
        "scaler_decisions": "counter",
        "scaler_cycle_duration_seconds": "histogram",
        "scaler_errors": "counter",
        "scaler_leader": "gauge",
        "scaler_host_cpu_percent": "gauge",
        "scaler_host_memory_percent": "gauge",
        "scaler_override": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind
    got = samples(text)
    assert got[("scaler_queue_depth", (("queue", "default"),))] == 7
    assert got[("scaler_queue_in_flight", (("queue", "default"),))] == 2
    assert got[("scaler_queue_oldest_age_seconds", (("queue", "default"),))] == 3.5
    # An empty queue has no oldest message: its age is absent (unknown), never "0 s old".
    assert ("scaler_queue_oldest_age_seconds", (("queue", "cpu_intensive"),)) not in got
    assert got[("scaler_queue_depth", (("queue", "cpu_intensive"),))] == 0
    # The unreadable queue is absent, not reported as an empty queue.
    assert ("scaler_queue_depth", (("queue", "default_low"),)) not in got
    assert got[("scaler_replicas_current", (("service", "default"),))] == 2
    assert got[("scaler_replicas_desired", (("service", "default"),))] == 3
    key = (("action", "up"), ("reason_kind", "target"), ("service", "default"))
    assert got[("scaler_decisions_total", key)] == 1
    key = (("action", "hold"), ("reason_kind", "paused"), ("service", "cpu_intensive"))
    assert got[("scaler_decisions_total", key)] == 1
    assert got[("scaler_errors_total", (("source", "broker"),))] == 1
    assert got[("scaler_errors_total", (("source", "docker"),))] == 0
    assert got[("scaler_cycle_duration_seconds_count", ())] == 1
    assert got[("scaler_leader", ())] == 1
    assert got[("scaler_host_cpu_percent", ())] == 55
    assert got[("scaler_override", (("mode", "pause"), ("service", "cpu_intensive")))] == 1
    assert ("scaler_service_cpu_percent", (("service", "cpu_intensive"),)) not in got


def test_a_signal_that_goes_missing_drops_its_series_and_counts_accumulate(
    serve: ServerFactory,
) -> None:
    metrics = ScalerMetrics()
    server = serve(metrics=metrics)
    obs = observations()
    metrics.record_cycle(observations=obs, duration_s=0.01, leader=True)
    lost = Observations(
        at=obs.at,
        services={
            "default": ServiceObservation(
                "default",
                None,
                {"default": QueueSignal("default", None, None, None, obs.at)},
                Resources(None, None),
            )
        },
        host=Resources(None, None),
        errors=("broker: depth of default unreadable",),
    )
    metrics.record_cycle(
        observations=lost,
        duration_s=0.02,
        leader=False,
        errors=[*lost.errors, "docker", "default: scale to 3 failed after 3 attempts: boom"],
        overrides={},
    )
    got = samples(call(server, "GET", "/metrics")[2])
    assert ("scaler_queue_depth", (("queue", "default"),)) not in got
    assert ("scaler_replicas_current", (("service", "default"),)) not in got
    assert ("scaler_replicas_current", (("service", "cpu_intensive"),)) not in got
    assert math.isnan(got[("scaler_host_cpu_percent", ())])
    assert got[("scaler_leader", ())] == 0
    assert got[("scaler_cycle_duration_seconds_count", ())] == 2
    assert got[("scaler_errors_total", (("source", "broker"),))] == 1
    assert got[("scaler_errors_total", (("source", "docker"),))] == 1
    assert got[("scaler_errors_total", (("source", "backend"),))] == 1


def test_record_cycle_rejects_bad_values_naming_them() -> None:
    metrics = ScalerMetrics()
    with pytest.raises(ValueError, match="duration_s"):
        metrics.record_cycle(observations=None, duration_s=-1, leader=False)
    bad = DecisionRecord("default", 1, 2, "sideways", "target")
    with pytest.raises(ValueError, match="sideways"):
        metrics.record_cycle(observations=None, decisions=[bad], duration_s=0, leader=False)


@pytest.mark.parametrize(
    ("reasons", "emergency", "kind"),
    [
        (("pinned to 3 by operator (ops)",), False, "pinned"),
        (("holding at 2: default waiting unknown",), False, "missing-signal"),
        (("x", "scale-up cooldown: last change 3 s ago < 30 s -> hold 2"), False, "cooldown"),
        (("x", "emergency on queue q (depth 900 > 500): 8 at once"), True, "emergency"),
        (("work 0 (waiting 0, in flight 0) / target 5 per replica -> 0",), False, "target"),
    ],
)
def test_reason_kind_is_a_bounded_label(
    reasons: tuple[str, ...], emergency: bool, kind: str
) -> None:
    assert reason_kind(Decision("s", 2, 2, "hold", reasons, emergency)) == kind


def test_error_source_reads_the_prefix_then_keywords() -> None:
    assert error_source("broker: depth of q unreadable") == "broker"
    assert error_source("policy") == "policy"
    assert error_source("redis.exceptions.ConnectionError: refused") == "broker"
    assert error_source("something odd") == "other"


def test_status_serves_the_snapshot_and_reports_a_failing_one(serve: ServerFactory) -> None:
    server = serve(status=lambda: {"cycle": 12, "services": {"default": {"current": 2}}})
    status, headers, body = call(server, "GET", "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert body == {"cycle": 12, "services": {"default": {"current": 2}}}

    def broken() -> dict[str, object]:
        raise RuntimeError("state file unreadable")

    status, _, body = call(serve(status=broken), "GET", "/status")
    assert status == 500
    assert "state file unreadable" in body["error"]


def test_healthz_follows_the_loop(serve: ServerFactory) -> None:
    clock = Clock()
    metrics = ScalerMetrics()
    server = serve(metrics=metrics, clock=clock, health_max_age_s=30)
    status, _, body = call(server, "GET", "/healthz")
    assert (status, body["ok"]) == (503, False)
    assert "no cycle yet" in body["reason"]

    metrics.record_cycle(observations=None, duration_s=0.1, leader=True, clock=clock)
    clock.now += 5
    status, _, body = call(server, "GET", "/healthz")
    assert (status, body["ok"]) == (200, True)
    assert body["last_cycle_age_s"] == 5

    clock.now += 60  # the loop is stuck
    status, _, body = call(server, "GET", "/healthz")
    assert status == 503
    assert "65.0 s ago, more than 30" in body["reason"]


def test_control_is_disabled_without_a_configured_token(
    serve: ServerFactory, store: ControlStore
) -> None:
    server = serve(control=store, token=None)
    status, _, body = call(server, "POST", "/services/default/pause", token=TOKEN)
    assert status == 403
    assert "SCALER_TOKEN" in body["error"]
    assert store.overrides() == {}


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token", ""])
def test_control_refuses_a_missing_or_wrong_token(
    serve: ServerFactory, store: ControlStore, token: str | None
) -> None:
    server = serve(control=store)
    for action, body in (("pause", None), ("pin", {"replicas": 1}), ("unpin", None)):
        status, headers, reply = call(
            server, "POST", f"/services/default/{action}", body, token=token
        )
        assert status == 401, (action, reply)
        assert headers["www-authenticate"] == "Bearer"
        assert "token" in reply["error"]
    assert store.overrides() == {}


def test_control_with_the_token_is_applied_and_seen_by_another_replica(
    serve: ServerFactory, store: ControlStore, rclient: redis.Redis
) -> None:
    server = serve(control=store)
    status, _, body = call(
        server, "POST", "/services/default/pause", {"reason": "deploy"}, token=TOKEN
    )
    assert status == 200, body
    assert body["override"]["mode"] == "pause"
    status, _, body = call(
        server, "POST", "/services/cpu_intensive/pin", {"replicas": 2, "by": "alice"}, token=TOKEN
    )
    assert status == 200, body

    # A second scaler replica, with its own connection, reads the same overrides.
    other = ControlStore(rclient, LIMITS, prefix=store.key.removesuffix("scaler:overrides"))
    seen = other.overrides()
    assert set(seen) == {"default", "cpu_intensive"}
    assert seen["default"].mode == "pause"
    assert seen["default"].reason == "deploy"
    assert seen["default"].by.startswith("api@127.0.0.1")
    assert seen["cpu_intensive"].mode == "pin"
    assert seen["cpu_intensive"].replicas == 2
    # The name the caller gave is kept beside its address, never instead of it.
    assert seen["cpu_intensive"].by == "alice via api@127.0.0.1"
    controls = other.controls()
    assert controls["default"].paused and controls["default"].pinned is None
    assert controls["cpu_intensive"].pinned == 2 and "alice" in controls["cpu_intensive"].note

    status, _, body = call(server, "GET", "/overrides")
    assert status == 200
    assert body["overrides"]["cpu_intensive"]["replicas"] == 2

    status, _, body = call(server, "POST", "/services/default/resume", token=TOKEN)
    assert (status, body["removed"]["mode"]) == (200, "pause")
    status, _, body = call(server, "POST", "/services/cpu_intensive/unpin", token=TOKEN)
    assert (status, body["removed"]["replicas"]) == (200, 2)
    status, _, body = call(server, "POST", "/services/cpu_intensive/unpin", token=TOKEN)
    assert (status, body["removed"]) == (200, None)
    assert other.overrides() == {}


@pytest.mark.parametrize(
    ("service", "body", "status", "words"),
    [
        ("default", {"replicas": 5}, 400, ["replicas", "'default'", "[0, 4]", "got 5"]),
        ("default", {"replicas": -1}, 400, ["replicas", "[0, 4]", "got -1"]),
        ("default", {"replicas": "3"}, 400, ["must be an integer", "got '3'"]),
        ("default", {"replicas": True}, 400, ["must be an integer", "got True"]),
        ("default", {"replicas": 1.5}, 400, ["must be an integer", "got 1.5"]),
        ("default", {}, 400, ["replicas missing"]),
        ("default", {"replicas": 1, "colour": "red"}, 400, ["unknown field", "colour"]),
        ("default", {"replicas": 1, "reason": "x" * 500}, 400, ["reason", "at most 200"]),
        ("nope", {"replicas": 1}, 404, ["'nope'", "not managed", "cpu_intensive"]),
        ("default", [1], 400, ["JSON object", "list"]),
    ],
)
def test_bad_pin_requests_are_rejected_with_a_message(
    serve: ServerFactory,
    store: ControlStore,
    service: str,
    body: object,
    status: int,
    words: list[str],
) -> None:
    server = serve(control=store)
    got, _, reply = call(server, "POST", f"/services/{service}/pin", body, token=TOKEN)
    assert got == status, reply
    for word in words:
        assert word in reply["error"]
    assert store.overrides() == {}


def test_malformed_requests_and_unknown_paths(serve: ServerFactory, store: ControlStore) -> None:
    server = serve(control=store)
    status, _, reply = call(server, "POST", "/services/default/pin", raw=b"{not json", token=TOKEN)
    assert status == 400 and "not valid JSON" in reply["error"]
    assert call(server, "GET", "/nowhere")[0] == 404
    assert call(server, "POST", "/services/default/explode", token=TOKEN)[0] == 404
    assert call(server, "GET", "/services/default/pause")[0] == 405


def test_resume_on_a_pinned_service_is_a_conflict(
    serve: ServerFactory, store: ControlStore
) -> None:
    server = serve(control=store)
    assert call(server, "POST", "/services/default/pin", {"replicas": 3}, token=TOKEN)[0] == 200
    status, _, reply = call(server, "POST", "/services/default/resume", token=TOKEN)
    assert status == 409
    assert "use unpin" in reply["error"]
    assert store.overrides()["default"].replicas == 3
    with pytest.raises(ConflictError):
        store.resume("default")


def test_store_validates_and_clamps_pins_after_a_policy_reload(store: ControlStore) -> None:
    with pytest.raises(UnknownServiceError, match="'ghost'"):
        store.pause("ghost", by="ops")
    with pytest.raises(ControlError, match="by"):
        store.pause("default", by=" ")
    store.pin("default", 4, by="ops", reason="load test")
    store.test_limits["default"] = 2  # type: ignore[attr-defined]  # reload lowered max
    got = store.overrides()["default"]
    assert got.replicas == 2
    assert "clamped to max 2" in got.reason
    del store.test_limits["default"]  # type: ignore[attr-defined]  # no longer managed
    assert "default" not in store.overrides()


def test_http_settings_from_the_environment() -> None:
    assert HttpSettings.from_env({}) == HttpSettings("127.0.0.1", 9808, None)
    got = HttpSettings.from_env(
        {"SCALER_HTTP_HOST": "0.0.0.0", "SCALER_HTTP_PORT": "9900", "SCALER_TOKEN": TOKEN}
    )
    assert got == HttpSettings("0.0.0.0", 9900, TOKEN)
    assert HttpSettings.from_env({"SCALER_TOKEN": "  "}).token is None
    with pytest.raises(ValueError, match=r"SCALER_HTTP_PORT .* got 'http'"):
        HttpSettings.from_env({"SCALER_HTTP_PORT": "http"})
    with pytest.raises(ValueError, match=r"SCALER_HTTP_PORT .* got '70000'"):
        HttpSettings.from_env({"SCALER_HTTP_PORT": "70000"})
    with pytest.raises(ValueError, match=r"SCALER_TOKEN .* 5 characters"):
        HttpSettings.from_env({"SCALER_TOKEN": "short"})


# -- hostile requests: each defect of the hand-written server, now answered with a 4xx ------------


def raw_request(server: ScalerHTTPServer, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers before closing."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunk:
                break
        return b"".join(chunks)


def test_deeply_nested_json_is_a_400_not_a_dropped_connection(
    serve: ServerFactory, store: ControlStore
) -> None:
    server = serve(control=store)
    for nested in (b"[" * 2000 + b"]" * 2000, b'{"replicas": ' + b"[" * 1500 + b"]" * 1500 + b"}"):
        status, _, reply = call(server, "POST", "/services/default/pin", raw=nested, token=TOKEN)
        assert status == 400, reply
        assert "nested too deeply" in reply["error"]
    assert call(server, "GET", "/overrides")[0] == 200, "the server still answers"
    assert store.overrides() == {}


def chunked_post(server: ScalerHTTPServer, path: str, parts: list[bytes]) -> tuple[int, Any]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(
            "POST",
            path,
            body=iter(parts),
            headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_chunked_body_is_read_not_replaced_by_defaults(
    serve: ServerFactory, store: ControlStore
) -> None:
    server = serve(control=store)
    status, reply = chunked_post(
        server, "/services/default/pin", [b'{"replicas": ', b'3, "reason": "chun', b'ked"}']
    )
    assert status == 200, reply
    got = store.overrides()["default"]
    assert (got.replicas, got.reason) == (3, "chunked")
    # Past the size limit, chunked or not: 413, nothing applied.
    big = [b'{"reason": "', b"x" * 3000, b"y" * 3000, b'"}']
    status, reply = chunked_post(server, "/services/cpu_intensive/pause", big)
    assert status == 413 and "larger than 4096 bytes" in reply["error"]
    status, _, reply = call(
        server, "POST", "/services/cpu_intensive/pause", raw=b" " * 5000, token=TOKEN
    )
    assert status == 413 and "larger than 4096 bytes" in reply["error"]
    assert "cpu_intensive" not in store.overrides()


def test_the_audit_trail_keeps_the_callers_address_whatever_the_body_or_headers_say(
    serve: ServerFactory, store: ControlStore
) -> None:
    server = serve(control=store)
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request(
        "POST",
        "/services/default/pause",
        body=json.dumps({"by": "api@10.9.8.7", "reason": "spoof"}),
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "X-Forwarded-For": "6.6.6.6",
            "Forwarded": "for=6.6.6.6",
        },
    )
    assert conn.getresponse().status == 200
    conn.close()
    assert store.overrides()["default"].by == "api@10.9.8.7 via api@127.0.0.1"
    assert call(server, "POST", "/services/default/resume", token=TOKEN)[0] == 200
    for bad in ("", "  ", 7, "x" * 101):
        status, _, reply = call(server, "POST", "/services/default/pause", {"by": bad}, token=TOKEN)
        assert status == 400 and "by must be" in reply["error"], (bad, reply)
    assert store.overrides() == {}


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset), without waiting for it."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_connections_are_bounded_served_by_one_thread_and_idle_ones_closed(
    serve: ServerFactory,
) -> None:
    server = serve(limit_concurrency=6, max_streams=2, idle_timeout_s=1)
    host, port = server.address
    threads_before = threading.active_count()
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(40)]
    try:
        # No thread per connection: 40 sockets, the same threads.
        assert threading.active_count() == threads_before
        # Past the limit the oldest idle connections make room for the newer ones: at most 6
        # stay open, and a request still gets an answer at once.
        poll_until(
            lambda: sum(map(closed_by_server, idle)) >= 34, "the server to close 34 of 40", 10
        )
        assert sum(not closed_by_server(sock) for sock in idle) <= 6
        assert call(server, "GET", "/metrics")[0] == 200
        # A connection that sends nothing is closed after the idle timeout.
        poll_until(lambda: all(map(closed_by_server, idle)), "the idle connections to close", 10)
    finally:
        for sock in idle:
            sock.close()


def test_past_the_limit_with_every_slot_mid_request_a_request_gets_503_at_once(
    serve: ServerFactory,
) -> None:
    release = threading.Event()

    def slow_status() -> dict[str, Any]:
        release.wait(10)
        return {"cycle": 1}

    server = serve(limit_concurrency=6, max_streams=2, status=slow_status)
    host, port = server.address
    busy = [socket.create_connection((host, port), timeout=10) for _ in range(6)]
    try:
        for sock in busy:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        poll_until(
            lambda: sum(c.reading_since is None for c in server.guard.open) == 6,
            "six requests in flight",
            10,
        )
        # Nothing to displace: a request in flight is never cut off. Refused, with a reason.
        reply = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert "busy" in json.loads(body)["error"]
        release.set()
        for sock in busy:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "the requests in flight finish"
    finally:
        release.set()
        for sock in busy:
            sock.close()


@pytest.mark.parametrize(
    ("raw", "headers", "status", "words"),
    [
        (b"\xff\xfe{", {}, 400, ["not valid JSON"]),
        (b'"just a string"', {}, 400, ["JSON object", "str"]),
        (b"{}", {"Content-Length": "nope"}, 400, ["Content-Length"]),
        (b"", {"Content-Length": "999999"}, 413, ["larger than"]),
    ],
)
def test_malformed_bodies_get_a_4xx_with_a_message(
    serve: ServerFactory,
    store: ControlStore,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    words: list[str],
) -> None:
    server = serve(control=store)
    length = headers.get("Content-Length", str(len(raw)))
    request = (
        "POST /services/default/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode() + raw
    reply = raw_request(server, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    if status == 400 and length == "nope":
        # h11 refuses a non-numeric Content-Length before the application sees it.
        assert head.startswith(b"HTTP/1.1 400"), head
        return
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    message = json.loads(body)["error"]
    for word in words:
        assert word in message
    assert store.overrides() == {}


def test_the_openapi_schema_lists_every_endpoint(serve: ServerFactory) -> None:
    status, _, schema = call(serve(), "GET", "/openapi.json")
    assert status == 200
    paths = set(schema["paths"])
    assert {"/metrics", "/status", "/healthz", "/overrides", "/events", "/api/live"} <= paths
    for action in ("pause", "resume", "pin", "unpin"):
        operation = schema["paths"][f"/services/{{service}}/{action}"]["post"]
        assert operation["security"] == [{"bearer": []}]
        assert {"400", "401", "403", "404", "413"} <= set(operation["responses"])
    pin = schema["paths"]["/services/{service}/pin"]["post"]["requestBody"]
    assert pin["content"]["application/json"]["schema"]["required"] == ["replicas"]


# -- the dashboard's page and its event stream -------------------------------------------------


def test_the_dashboard_page_and_its_assets_are_served(serve: ServerFactory) -> None:
    server = serve(live=LiveFeed())
    status, headers, page = call(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page and "/static/uPlot.iife.min.js" in page
    for name in ("app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"):
        assert call(server, "GET", f"/static/{name}")[0] == 200, name
    assert call(server, "GET", "/static/../api.py")[0] == 404
    assert call(server, "GET", "/static/nothing.js")[0] == 404


def read_sse(resp: http.client.HTTPResponse, event: str) -> dict[str, Any]:
    """Read the stream until an event named ``event``; its JSON data."""
    name = None
    while True:
        line = resp.fp.readline().decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name == event:
            data: dict[str, Any] = json.loads(line.removeprefix("data: "))
            return data


def test_the_event_stream_sends_the_history_then_each_cycle(serve: ServerFactory) -> None:
    from test_live import FakeScaler

    feed = LiveFeed()
    fake = FakeScaler()
    feed.attach(fake)  # type: ignore[arg-type]
    fake.cycle_with(feed, waiting=5, current=1)
    server = serve(live=feed, max_streams=1)
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/events")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type", "").startswith("text/event-stream")
    init = read_sse(resp, "init")
    assert [p["services"]["io"]["waiting"] for p in init["points"]] == [5]
    assert init["control"] is True
    # Only one stream allowed here: the next one is refused, not queued.
    assert call(server, "GET", "/events")[0] == 503
    fake.cycle_with(feed, waiting=40, current=2, started=("io-2@h",))
    update = read_sse(resp, "update")
    assert [p["services"]["io"]["waiting"] for p in update["points"]] == [40]
    assert update["points"][0]["services"]["io"]["starting"] == 1
    assert any(e["kind"] == "scale" for e in update["events"])
    assert update["status"]["services"]["io"]["waiting"] == 40
    conn.close()


def test_the_policy_in_force_and_failed_scales_are_exported_for_alerts() -> None:
    from scaler.policy import parse_policy

    policy = parse_policy(
        {
            "services": {
                "io": {"queues": ["io_intensive", "io_low"], "max_replicas": 8,
                       "target": {"tasks_per_replica": 5, "latency_s": 30}},
                "cpu": {"queues": ["cpu_intensive"], "min_replicas": 0, "max_replicas": 2},
            }
        },
        env={},
    )  # fmt: skip
    metrics = ScalerMetrics()
    failed = "io: scale to 9 failed after 3 attempts: RuntimeError: boom"
    metrics.record_cycle(observations=None, duration_s=0, leader=True, policy=policy,
                         errors=[failed], scale_failed=["io"])  # fmt: skip
    got = samples(metrics.exposition().decode())
    assert got[("scaler_replicas_max", (("service", "io"),))] == 8
    assert got[("scaler_replicas_min", (("service", "cpu"),))] == 0
    assert got[("scaler_latency_objective_seconds", (("service", "io"),))] == 30
    assert ("scaler_latency_objective_seconds", (("service", "cpu"),)) not in got
    assert got[("scaler_queue_service_info", (("queue", "io_low"), ("service", "io")))] == 1
    assert got[("scaler_scale_failures_total", (("service", "io"),))] == 1
    assert got[("scaler_scale_failures_total", (("service", "cpu"),))] == 0
    assert got[("scaler_errors_total", (("source", "backend"),))] == 1
