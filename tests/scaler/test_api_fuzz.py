"""The scaler's HTTP API fuzzed against its own OpenAPI schema (schemathesis), on a real socket.

Schemathesis generates requests from /openapi.json, valid ones and invalid ones (wrong types,
missing or extra fields, bodies that are not objects, odd headers), with and without the token,
and checks the answers: never a 5xx, a status code and content type the schema documents, invalid
data refused with a 4xx. Each request has a 5 s timeout, so a hang fails the test. The control
store is real (Redis), so an accepted pause or pin is really written.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from scaler.api import ScalerHTTPServer
from scaler.control import ControlStore
from scaler.live import LiveFeed
from scaler.metrics import ScalerMetrics

TOKEN = "fuzz-" + "t" * 27
LIMITS = {"default": 4, "cpu_intensive": 2}
MAX_EXAMPLES = 40  # per endpoint; about 10 s for the whole API on a 2-core machine


@pytest.fixture(scope="module")
def fuzz_server(redis_url: str, key_prefix: str) -> Iterator[ScalerHTTPServer]:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    store = ControlStore(client, LIMITS, prefix=f"{key_prefix}fz{uuid.uuid4().hex[:6]}:")
    metrics = ScalerMetrics()
    metrics.record_cycle(observations=None, duration_s=0.01, leader=True)
    server = ScalerHTTPServer(
        host="127.0.0.1",
        port=0,
        metrics=metrics,
        status=lambda: {"cycle": 3, "services": {}},
        control=store,
        token=TOKEN,
        live=LiveFeed(),
        health_max_age_s=3600,
    )
    server.start()
    yield server
    server.stop()
    client.delete(store.key)
    client.close()


def test_the_api_answers_every_generated_request_without_5xx_or_hang(
    fuzz_server: ScalerHTTPServer,
) -> None:
    # The event stream never ends by design; its own test reads it (test_api.py).
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", timeout=5)
    api = api.exclude(path="/events")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    checked: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        ]
        if "{service}" in operation.path:  # also reach the store: a managed service's name
            strategies.append(
                operation.as_strategy(
                    GenerationMode.POSITIVE,
                    path_parameters={"service": "default"},
                )
            )

        @given(case=st.one_of(strategies))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=fuzz_server.url,
                headers=auth,
                timeout=5,
                # A pin above the service's max_replicas is valid by the schema (the limit is per
                # service and follows policy reloads) and refused with 400, by design.
                excluded_checks=[positive_data_acceptance],
            )

        call()
        checked.append(operation.label)
    assert len(checked) >= 9, checked  # every endpoint in the schema was fuzzed
