"""How the stack's scaler finds its Compose project: the scope of the engine gate it goes through.

The scaler's own container is not a managed one, so the gate does not let it read its labels; the
gate is told the project (GATE_PROJECT) and reports it in ``GET /gate/v1/status``. A real gate
(served in this process) on the real engine; a gate for a Swarm stack, and a Docker API that is
not a gate, give an error saying what to pass.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import docker
import pytest

from scaler.backends.compose import gate_project
from scaler.backends.engine import GATE_API_VERSION, default_client_factory, gate_token
from scaler.gate.app import Settings
from scaler.gate.rules import STACK_LABEL, Scope
from tests.gate.gate_support import TOKEN, GateServer, project_gate

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def engine() -> None:
    try:
        docker.from_env(timeout=30).ping()
    except Exception as exc:
        pytest.skip(f"DOCKER TESTS SKIPPED: no Docker engine reachable ({exc})")


def test_project_read_from_the_gate_s_scope() -> None:
    project = f"cst-test-detect-{uuid.uuid4().hex[:8]}"
    with project_gate(project) as gate:
        assert gate_project(gate.clients(timeout_s=10)) == project


def test_a_gate_for_a_stack_or_without_the_token_is_not_a_project() -> None:
    settings = Settings(scope=Scope(STACK_LABEL, "cst-test-stack"), token=TOKEN)
    with GateServer(settings) as gate:
        with pytest.raises(ValueError, match=r"stack.*not a Compose project"):
            gate_project(gate.clients(timeout_s=10))
        wrong = default_client_factory(gate.url, timeout_s=10, token="not-the-gate-token-at-all")
        with pytest.raises(ValueError, match="bearer token"):
            gate_project(wrong)


def test_outside_the_gate_the_error_says_what_was_asked() -> None:
    """The engine itself (no gate): no /gate/v1/status there."""
    with pytest.raises(ValueError, match=r"the engine gate's status could not be read"):
        gate_project(default_client_factory(timeout_s=10))


def test_the_token_comes_from_its_file_first_then_the_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-the-file-0123456789\n")
    both = {"SCALER_GATE_TOKEN_FILE": str(token), "SCALER_GATE_TOKEN": "from-the-environment"}
    assert gate_token(both) == "from-the-file-0123456789"
    assert gate_token({"SCALER_GATE_TOKEN": "from-the-environment"}) == "from-the-environment"
    assert gate_token({}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        gate_token({"SCALER_GATE_TOKEN_FILE": str(tmp_path / "empty")})


def test_a_gate_client_pins_the_version_and_sends_the_token() -> None:
    """No /version probe while constructing (the gate would answer 401 before the header)."""
    client = default_client_factory("tcp://127.0.0.1:9", token="t-0123456789abcdef")()
    try:
        assert client.api.api_version == GATE_API_VERSION
        assert client.api.headers["Authorization"] == "Bearer t-0123456789abcdef"
    finally:
        client.close()
