"""The gate fuzzed against its own OpenAPI description (schemathesis), in front of the real engine.

A small Compose project of the test's own (``cst-test-gate-<id>``: a managed template of service
``worker-f``, a managed ``worker-v`` the lifecycle operations may act on, an unmanaged look-alike,
a one-off and a managed container of another project) and a gate for it. Schemathesis generates
requests from ``GET /gate/v1/openapi.json``, valid and invalid, with the token and (its
``ignored_auth`` check) without, a bounded number per operation with a printed seed
(``GATE_FUZZ_SEED=<seed>`` repeats a run). Checked: never a 5xx, every answer's status, media
type, headers and body as the description says (an event stream: each of its lines a managed
container's event), the token enforced; then, on the engine, every
container the run made is its template's clone but for name and number, and the containers the
gate does not manage are as they were.

Streams are bounded here, not by the gate: ``/events`` gets a past ``until`` and ``stats``
``stream=0``, and a generated reference made only of hex digits (which the engine would take for
an id prefix of any container on this machine) is given a leading ``z``.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from gate_support import TOKEN, GateServer
from gate_world import World, cleanup, clone_differences, engine_or_skip, settings_for
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scaler.gate.rules import PROJECT_LABEL, SERVICE_LABEL

pytestmark = pytest.mark.docker

SEED = int(os.environ.get("GATE_FUZZ_SEED") or random.randrange(2**32))
MAX_EXAMPLES = 12  # per operation: about 300 requests, some seconds on a loaded 2-core machine
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEX = re.compile(r"[0-9a-f]+")


@pytest.fixture(scope="module")
def fuzz_world() -> Iterator[World]:
    client = engine_or_skip()
    uid = uuid.uuid4().hex[:10]
    project = f"cst-test-gate-{uid}"
    try:
        network = f"{project}_a"
        client.api.create_network(network, labels={"gate-test": uid})
        w = World(uid, project, f"{project}-other", client, [network], volume="")
        hardened = {k: v for k, v in w.hardened().items() if k != "binds"}
        w.template = f"{project}-worker-f-1"
        w.create(w.template, w.labels("worker-f", 1), **hardened)
        w.create(f"{project}-worker-v-1", w.labels("worker-v", 1), stop_timeout=2)
        w.lookalike = f"{project}-worker-f-98"
        w.create(w.lookalike, w.labels("worker-f", 98, managed=False))
        w.oneoff = f"{project}-worker-f-run-1"
        w.create(w.oneoff, w.labels("worker-f", 1, oneoff=True), start=False)
        w.other = f"{w.other_project}-worker-f-1"
        w.create(w.other, w.labels("worker-f", 1, project=w.other_project))
        yield w
    finally:
        cleanup(client, uid)
        client.close()


def _unmanaged_view(inspected: dict[str, Any]) -> dict[str, Any]:
    """What a change to a container would show (not its health checks' log)."""
    state = {k: v for k, v in inspected["State"].items() if k != "Health"}
    keep = ("Id", "Name", "Created", "RestartCount", "Config", "HostConfig", "Image")
    return {"State": state, **{k: inspected[k] for k in keep}}


def _check_event_lines(text: str, project: str) -> None:
    """An event stream (the engine's media type, application/json, for JSON objects one a
    line, which no JSON Schema describes): each line a managed container's event."""
    for line in text.splitlines():
        event = json.loads(line)
        assert event["Type"] == "container" and not event["Action"].startswith("exec_"), line
        assert event["Actor"]["Attributes"][PROJECT_LABEL] == project, line


def _no_id_prefix(case: Any) -> Any:
    ref = (case.path_parameters or {}).get("ref")
    if isinstance(ref, str) and HEX.fullmatch(ref):
        case.path_parameters["ref"] = "z" + ref[:127]
    return case


def test_schemathesis_finds_no_5xx_no_answer_off_the_schema_and_no_unsafe_change(
    fuzz_world: World,
) -> None:
    w = fuzz_world
    print(f"\ngate fuzz: seed {SEED} (GATE_FUZZ_SEED={SEED} repeats it), {MAX_EXAMPLES} examples")
    before = {name: w.inspect(name) for name in w.names()}
    victim = f"{w.project}-worker-v-1"
    templates = {"worker-f": before[w.template], "worker-v": before[victim]}
    assert clone_differences(templates["worker-f"], before[w.lookalike])  # it tells them apart
    statuses: Counter[tuple[str, int]] = Counter()
    with GateServer(settings_for(w)) as gate:
        base = f"http://127.0.0.1:{gate.port}"
        api = schemathesis.openapi.from_url(f"{base}/gate/v1/openapi.json", headers=AUTH)
        operations = [result.ok() for result in api.get_all_operations()]
        # The Compose gate's 17 but the description's own URL, which schemathesis leaves out.
        assert len(operations) == 16, [o.label for o in operations]
        for operation in operations:
            fixed: dict[str, Any] = {}
            if operation.path == "/events":
                fixed["query"] = {"until": str(int(time.time()) - 1)}
            elif operation.path.endswith("/stats"):
                fixed["query"] = {"stream": "0"}
            strategies = [
                operation.as_strategy(mode, **fixed)
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            ]
            if "{ref}" in operation.path and not operation.path.endswith(("/stats", "/wait")):
                # Also reach the engine: a managed container's name.
                named = operation.as_strategy(path_parameters={"ref": victim}, **fixed)
                strategies.append(named)
            if operation.path == "/gate/v1/replicas":
                strategies.append(
                    st.integers(2, 999).flatmap(
                        lambda n, op=operation: op.as_strategy(
                            body={"service": "worker-f", "number": n, "warm": n % 2 == 0}
                        )
                    )
                )

            # Cases that reach the engine whatever the seed: the victim read, two clones made.
            explicit: list[Any] = []
            if operation.path == "/containers/{ref}/json":
                explicit.append(operation.Case(path_parameters={"ref": victim}))
            if operation.path == "/gate/v1/replicas":
                for number, warm in ((500, False), (501, True)):
                    wanted = {"service": "worker-f", "number": number, "warm": warm}
                    explicit.append(operation.Case(body=wanted, media_type="application/json"))
            for case in explicit:
                response = case.call_and_validate(
                    base_url=base, headers=AUTH, timeout=15, checks=CHECKS
                )
                statuses[(operation.label, response.status_code)] += 1

            @given(case=st.one_of(strategies).map(_no_id_prefix))
            @seed(SEED)
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case: Any) -> None:
                stream = case.operation.path == "/events"
                checks = [c for c in CHECKS if not (stream and c is response_schema_conformance)]
                response = case.call_and_validate(
                    base_url=base, headers=AUTH, timeout=15, checks=checks
                )
                statuses[(case.operation.label, response.status_code)] += 1
                if stream and response.status_code == 200:
                    _check_event_lines(response.text, w.project)

            call()

    print("gate fuzz: answers", dict(sorted(statuses.items())))
    reached = {label for label, _ in statuses}
    assert reached == {o.label for o in operations}
    assert statuses[("POST /gate/v1/replicas", 201)] >= 2, "no clone was made"
    assert statuses[("GET /containers/{ref}/json", 200)] >= 1, "no container reached"

    after = {name: w.inspect(name) for name in w.names()}
    made = set(after) - set(before)
    assert {f"{w.project}-worker-f-500", f"{w.project}-worker-f-501"} <= made
    for name in made:
        clone = after[name]
        service = clone["Config"]["Labels"][SERVICE_LABEL]
        assert service in templates, f"{name}: a container of service {service!r}"
        assert name.startswith(f"{w.project}-{service}-"), name
        assert clone_differences(templates[service], clone) == [], name
    for name in (w.lookalike, w.oneoff, w.other):
        assert name in after, f"{name} (not managed) is gone"
        assert _unmanaged_view(after[name]) == _unmanaged_view(before[name]), name
