"""The Swarm suite's shared cluster: three managers and a registry, started once per test run.

tests/conftest.py schedules every test under tests/swarm/ on one xdist worker ("swarm"), so one
session fixture owns the cluster. The application image is built by the e2e suite's builder
(`docker compose build` of the stack's own compose file, wheelhouse first) under a tag of its
own, then pushed with the Redis and PostgreSQL images once; nodes pull them as
``registry:5000/<repo>:<tag>``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from cluster import NODES, SwarmCluster, SwarmImages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import (
    COMPOSE_DIR,
    ROOT,
    ComposeProject,
    docker_engine_available,
    docker_socket_gid,
    ensure_wheelhouse,
)

# Its own tag per checkout when two runs share an engine (SWARM_APP_IMAGE), as e2e and chaos do.
APP_IMAGE = os.environ.get("SWARM_APP_IMAGE", "celery-stack/app:swarm")
# The whole session's setup (image build, cluster, pushes, pulls) lands on the first swarm test.
SETUP_TIMEOUT_S = 900


def build_app_image(directory: Path, tag: str = APP_IMAGE) -> str:
    """The application image, built as the e2e suite builds it (compose build), tagged ``tag``."""
    ensure_wheelhouse()
    env_file = directory / ".env"  # fresh secrets: Compose interpolates them even to build
    subprocess.run(
        ["bash", str(ROOT / "compose/scripts/init-env.sh"), str(ROOT / ".env.example"), env_file],
        check=True,
        capture_output=True,
    )
    # SECRETS_DIR: compose.yaml names the secret files' directory; a build needs only the name.
    settings = {
        "APP_IMAGE": tag,
        "DOCKER_GID": docker_socket_gid(),
        "SECRETS_DIR": str(directory / ".env.secrets"),
    }
    project = ComposeProject(
        name=f"cst-test-swarm-build-{uuid.uuid4().hex[:8]}",
        env_file=env_file,
        files=(COMPOSE_DIR / "compose.yaml",),
        env={**os.environ, **settings},
    )
    project.run("build", "migrate", timeout=900)  # every app service shares this one image
    return tag


def images_of(cluster: SwarmCluster, app: str = APP_IMAGE) -> SwarmImages:
    """Push the three images (in one go, once per cluster: ``push`` remembers) and name them."""
    redis_image = os.environ.get("REDIS_IMAGE", "local/redis:7")
    postgres_image = os.environ.get("POSTGRES_IMAGE", "local/postgres:15")
    cluster.push(app, redis_image, postgres_image)
    return SwarmImages(
        app=cluster.pushed(app),
        redis=cluster.pushed(redis_image),
        postgres=cluster.pushed(postgres_image),
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a swarm test; give the first one room for the session's setup."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.swarm)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT_S))


@pytest.fixture(scope="session")
def swarm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmCluster]:
    """The run's three-manager swarm, with the app, Redis and PostgreSQL images on every node."""
    if not docker_engine_available():
        pytest.skip(
            "SWARM TESTS SKIPPED: no Docker engine here (install one with "
            "../shared/tools/install-docker.sh); these tests are required in CI"
        )
    started = time.monotonic()
    app = build_app_image(tmp_path_factory.mktemp("swarm-build"))
    built = time.monotonic() - started
    with SwarmCluster() as cluster:
        cluster.timings["app_image_build"] = built
        try:
            t0 = time.monotonic()
            # One `docker save` and one upload of the base layer the three share.
            images = images_of(cluster, app)
            cluster.timings["push_all"] = time.monotonic() - t0
            t1 = time.monotonic()
            # Every node pulls all three at once now (their common base layer once per node), so
            # no test waits on a first pull or times out on one.
            for ref in (images.app, images.redis, images.postgres):
                cluster.pull(ref, NODES)
            cluster.timings["pull_all"] = time.monotonic() - t1
        except BaseException:
            with contextlib.suppress(Exception):  # never hide the failure itself
                print(cluster.diagnostics())
            raise
        cluster.timings["fixture_setup"] = time.monotonic() - started
        print(
            f"swarm cluster {cluster.prefix} setup (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in cluster.timings.items())
        )
        yield cluster


@pytest.fixture(scope="session")
def swarm_images(swarm_cluster: SwarmCluster) -> SwarmImages:
    """The registry names of the app, Redis and PostgreSQL images (pushed and pulled already)."""
    return images_of(swarm_cluster)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed swarm test, attach the nodes, services, tasks and engine logs."""
    report = yield
    cluster = getattr(item, "funcargs", {}).get("swarm_cluster")
    if report.when == "call" and report.failed and isinstance(cluster, SwarmCluster):
        try:
            report.sections.append((f"swarm cluster ({cluster.prefix})", cluster.diagnostics()))
        except Exception as exc:  # diagnostics must never hide the failure itself
            report.sections.append(("swarm cluster", f"diagnostics failed: {exc}"))
    return report
