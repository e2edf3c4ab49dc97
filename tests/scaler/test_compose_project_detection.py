"""How the stack's scaler finds its Compose project: its own container's project label.

The label is read from the real Docker engine; only /proc/self/mountinfo is written by the test
(this test process does not run inside a container, so it names one it created).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from scaler.backends.compose import own_compose_project, own_container_ids

CONTAINER_ID = "52f3f3cc737cce20d6d234d413c47a9da0f75e5d7706c069a32b98b42471693e"
OTHER_ID = "a" * 64


def mountinfo_line(container_id: str, what: str, target: str) -> str:
    return (
        f"90 72 254:0 /var/lib/docker/containers/{container_id}/{what} {target} "
        "rw,relatime - ext4 /dev/vda rw\n"
    )


def test_id_comes_from_the_hostname_mount_only() -> None:
    text = (
        mountinfo_line(OTHER_ID, "mounts/shm", f"/var/lib/docker/containers/{OTHER_ID}/mounts/shm")
        + mountinfo_line(CONTAINER_ID, "resolv.conf", "/etc/resolv.conf")
        + mountinfo_line(CONTAINER_ID, "hostname", "/etc/hostname")
    )
    assert own_container_ids(text, "") == [CONTAINER_ID]


def test_hostname_is_a_fallback_only_when_it_looks_like_an_id() -> None:
    assert own_container_ids("", CONTAINER_ID[:12]) == [CONTAINER_ID[:12]]
    assert own_container_ids("", "worker-1") == [], "a name could match another container"


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # no engine: the pure tests above still ran
        pytest.skip(f"DOCKER TESTS SKIPPED: no Docker engine reachable ({exc})")
    return client


@pytest.fixture
def labelled_container() -> Iterator[tuple[str, str]]:
    """A created (never started) container labelled as part of a Compose project."""
    client = docker_client()
    images = [t for i in client.images.list() for t in i.tags if t.startswith("local/python")]
    if not images:
        pytest.skip(
            "DOCKER TESTS SKIPPED: no local/python image (../shared/tools/build-base-images.sh)"
        )
    project = f"cst-test-detect-{uuid.uuid4().hex[:8]}"
    container = client.containers.create(
        images[0], command=["true"], labels={"com.docker.compose.project": project}
    )
    try:
        yield str(container.id), project
    finally:
        container.remove(force=True)
        client.close()


@pytest.mark.docker
def test_project_read_from_the_own_container_label(
    tmp_path: Path, labelled_container: tuple[str, str]
) -> None:
    container_id, project = labelled_container
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(mountinfo_line(container_id, "hostname", "/etc/hostname"))
    assert own_compose_project(mountinfo=mountinfo, hostname="") == project


@pytest.mark.docker
def test_outside_a_compose_container_the_error_says_what_to_pass(tmp_path: Path) -> None:
    docker_client().close()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(mountinfo_line(OTHER_ID, "hostname", "/etc/hostname"))
    with pytest.raises(ValueError, match=r"com\.docker\.compose\.project .*pass the project name"):
        own_compose_project(mountinfo=mountinfo, hostname="")
