"""The stack under test: built once per session, brought up under a unique project name.

The image variables (PYTHON_IMAGE, REDIS_IMAGE, POSTGRES_IMAGE) come from the environment; on a
machine without a registry they name the local stand-ins (.ci/run exports them). When a test
fails, `docker compose ps` and the logs are attached to its report (the stack is still up then).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from compose_project import (
    COMPOSE_DIR,
    ComposeProject,
    docker_engine_available,
    docker_socket_gid,
    ensure_wheelhouse,
    free_port,
    fresh_env_file,
)

# Settings the e2e run needs from the stack: a beat health check every few seconds instead of
# every five minutes, an image tag of its own (a developer's `make up` image stays untouched), and
# fewer io threads per replica so that a test burst needs the scaler (scaler-test-policy.yaml).
E2E_SETTINGS = {
    "HEALTH_CHECK_INTERVAL": "3",
    # E2E_APP_IMAGE: a tag of another checkout's own when two runs share one engine.
    "APP_IMAGE": os.environ.get("E2E_APP_IMAGE", "celery-stack/app:e2e"),
    "LOG_LEVEL": "INFO",
    "IO_CONCURRENCY": "8",
}
E2E_FILES = (
    COMPOSE_DIR / "compose.yaml",
    COMPOSE_DIR / "compose.prod.yaml",
    Path(__file__).with_name("compose.scaler-test.yaml"),
)


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ComposeProject]:
    if not docker_engine_available():
        pytest.skip(
            "E2E STACK TESTS SKIPPED: no Docker engine here (install one with "
            "../shared/tools/install-docker.sh); these tests are required in CI"
        )
    ensure_wheelhouse()
    # The scaler's port on a free loopback port (a developer's `make up` may hold 9808), and the
    # Docker socket's group, as `make up` detects it.
    settings = {
        **E2E_SETTINGS,
        "SCALER_HTTP_PORT_HOST": str(free_port()),
        # Flower (started by test_stack_e2e) off the developer's 5555.
        "FLOWER_HOST_PORT": str(free_port()),
        "DOCKER_GID": docker_socket_gid(),
    }
    project = ComposeProject(
        name=f"cst-test-e2e-{uuid.uuid4().hex[:8]}",
        env_file=fresh_env_file(tmp_path_factory.mktemp("stack"), settings, check=True),
        files=E2E_FILES,
        env={**os.environ, **settings},
    )
    try:
        project.run("build", timeout=900)
        project.run("up", "--detach", "--wait", "--wait-timeout", "180", timeout=300)
    except BaseException:
        print(project.diagnostics())
        project.down()
        raise
    try:
        yield project
    finally:
        project.down()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed stack test, attach `docker compose ps` and the logs while the stack runs."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.when == "call" and report.failed and isinstance(stack, ComposeProject):
        report.sections.append((f"docker compose ps and logs ({stack.name})", stack.diagnostics()))
    return report
