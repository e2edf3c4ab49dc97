"""Overrides read back from Redis are validated: a malformed one is reported and ignored.

Anyone holding Redis credentials that reach the overrides hash can write it (issue 11: before the
ACL users, every worker could). A value that passes JSON parsing but not the writers' own bounds
(``"replicas": -1``) used to reach the decision core and raise inside every cycle. Here such
values are planted in a real Redis and the store and a real loop cycle are watched.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from scaler.backends.base import ScaleResult, ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.control import ControlStore, InvalidOverride, Override
from scaler.fencing import UNFENCED, Fence
from scaler.loop import PolicySource, Scaler
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.status import read_snapshot

LIMITS = {"io": 3, "cpu": 2, "web": 4, "db": 2, "mail": 2, "etl": 2, "api": 2}
POLICY = """
interval_s: 0.5
stale_after_s: 5
services:
  io:
    queues: [io_intensive]
    min_replicas: 1
    max_replicas: 3
"""


def good(service: str, **fields: object) -> dict[str, object]:
    return {"service": service, "mode": "pin", "replicas": 1, "reason": "", "by": "t", "at": 1.0,
            **fields}  # fmt: skip


@pytest.fixture
def store(redis_url: str, key_prefix: str) -> Iterator[ControlStore]:
    prefix = f"{key_prefix}ctl{uuid.uuid4().hex[:6]}:"
    client = redis.Redis.from_url(redis_url)
    yield ControlStore(client, LIMITS, prefix=prefix)
    client.delete(f"{prefix}scaler:overrides")
    client.close()


def plant(store: ControlStore, service: str, value: object) -> None:
    raw = value if isinstance(value, str) else json.dumps(value)
    store.client.hset(store.key, service, raw)


# service -> (stored value, the field the report must name)
MALFORMED: dict[str, tuple[object, str]] = {
    "io": (good("io", replicas=-1), "replicas"),
    "cpu": (good("cpu", replicas=True), "replicas"),
    "web": (good("web", replicas="2"), "replicas"),
    "db": (good("io"), "service"),  # stored under db, names io
    "mail": (good("mail", mode="scale"), "mode"),
    "etl": ("{not json", "value"),
}


def test_malformed_overrides_are_ignored_and_each_reported_once_naming_the_field(
    store: ControlStore,
) -> None:
    for service, (value, _) in MALFORMED.items():
        plant(store, service, value)
    store.pin("api", 2, by="operator")  # a good one beside them

    assert set(store.overrides()) == {"api"}
    assert store.overrides()["api"].replicas == 2
    fresh = store.new_rejections()
    assert {e.service: e.field for e in fresh} == {
        "io": "replicas", "cpu": "replicas", "web": "replicas", "db": "service",
        "mail": "mode", "etl": "value",
    }  # fmt: skip
    for error in fresh:
        assert isinstance(error, InvalidOverride) and error.field in str(error)
    assert "-1" in store.rejected["io"] and "'io'" in store.rejected["io"]

    store.overrides()
    assert store.new_rejections() == [], "a value already reported is not reported every cycle"
    plant(store, "io", good("io", replicas=-2))  # a different bad value is news
    store.overrides()
    assert [e.service for e in store.new_rejections()] == ["io"]
    assert store.unpin("io") is not None, "an operator can still clear a malformed pin"
    assert store.resume("etl") is not None, "and a value that is not even JSON"
    assert store.client.hexists(store.key, "etl") == 0


def test_written_overrides_round_trip_through_the_strict_parser() -> None:
    pin = Override("io", "pin", 0, "drain for maintenance", "ops", 1.5)
    assert Override.parse(json.dumps(pin.as_json()), "io") == pin
    pause = Override("io", "pause", None, "", "ops", 2.0)
    assert Override.from_json(json.dumps(pause.as_json())) == pause
    with pytest.raises(InvalidOverride, match="replicas: expected null for a pause"):
        Override.parse(json.dumps({**pause.as_json(), "replicas": 2}), "io")


class CountingBackend(LocalBackend):
    """The real local backend, counting scale calls instead of spawning workers."""

    calls: list[int]

    def scale(self, service: str, replicas: int, fence: Fence = UNFENCED) -> ScaleResult:
        self.calls.append(replicas)
        return ScaleResult(service, self.replicas(service), replicas)


def test_a_malformed_override_does_not_stop_the_loop(
    tmp_path: Path, redis_url: str, store: ControlStore
) -> None:
    app = Celery("ctl-test", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"ct{uuid.uuid4().hex[:6]}:"}
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    backend = CountingBackend(app=app, workdir=tmp_path / "workers")
    backend.calls = []
    backend.manage([ServiceSpec("io", ("io_intensive",))])
    scaler = Scaler(
        PolicySource.from_file(policy_file),
        backend,
        Collector(queue_reader_for_app(app)),
        state_file=tmp_path / "state.json",
    )
    scaler.control = store
    plant(store, "io", good("io", replicas=-1))

    for _ in range(2):
        report = scaler.cycle()
    # Decided as if there were no override: up to the policy's min, by the loop's own rules.
    assert report.decisions["io"].desired == 1
    assert "pinned" not in " ".join(report.decisions["io"].reasons)
    assert backend.calls and backend.calls[0] == 1
    assert not any(e.startswith("control") for e in report.errors)
    snapshot = read_snapshot(scaler.state_file)  # type: ignore[arg-type]
    said = [e for e in snapshot["events"] if "override-rejected" in e]
    assert len(said) == 1 and "replicas" in said[0] and said[0].startswith("io "), said
    assert snapshot["overrides"] == {}
