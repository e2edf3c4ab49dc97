"""The application image as the stack runs it: a read-only root filesystem, so bytecode that is
missing or stale would be compiled again at every start of every worker the scaler adds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from compose_project import ComposeProject

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PROBE = Path(__file__).with_name("probe_bytecode.py")


def test_a_worker_start_compiles_nothing_on_the_read_only_image(stack: ComposeProject) -> None:
    image = stack.env["APP_IMAGE"]  # built by the session's stack fixture
    proc = subprocess.run(
        ["docker", "run", "--rm", "--read-only", "--network", "none", "--cap-drop", "ALL",
         "-v", f"{PROBE}:/probe.py:ro", image, "python", "/probe.py"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["dont_write_bytecode"] == 1  # PYTHONDONTWRITEBYTECODE: no attempt to write
    assert found["modules_imported"] > 300  # the probe really imported the worker's modules
    assert found["compiled_at_import"] == []
    assert found["missing_in_venv"] == []
    assert found["missing_in_stdlib"] == []
    assert found["not_unchecked_hash_in_venv"] == []
