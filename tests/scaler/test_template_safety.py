"""Which inspected container settings make a template unsafe to clone, and the policy's allowlist
of bind mounts (the real-engine refusal is in test_compose_backend.py)."""

from __future__ import annotations

from typing import Any

import pytest

from scaler.backends.template_safety import (
    EXTRA_BIND_MOUNTS_ENV,
    extra_bind_mounts,
    unsafe_settings,
)
from scaler.policy import PolicyError, parse_policy

# What a Compose worker looks like on a cgroup v1 host (CgroupnsMode "host" is the default there).
SAFE: dict[str, Any] = {
    "Name": "/p-worker-1",
    "HostConfig": {
        "Privileged": False,
        "CapAdd": None,
        "CapDrop": ["ALL"],
        "Devices": [],
        "NetworkMode": "p_backend",
        "PidMode": "",
        "IpcMode": "private",
        "CgroupnsMode": "host",
        "SecurityOpt": ["no-new-privileges:true"],
        "Binds": None,
    },
    "Mounts": [
        {"Type": "volume", "Source": "/var/lib/docker/volumes/x/_data", "Destination": "/d"}
    ],
}


def with_host(**host: Any) -> dict[str, Any]:
    return {**SAFE, "HostConfig": {**SAFE["HostConfig"], **host}}


def test_a_plain_worker_is_safe() -> None:
    assert unsafe_settings(SAFE) == []


@pytest.mark.parametrize(
    ("inspected", "words"),
    [
        (with_host(Privileged=True), "HostConfig.Privileged is true"),
        (with_host(CapAdd=["NET_ADMIN"]), "HostConfig.CapAdd adds ['NET_ADMIN']"),
        (with_host(Devices=[{"PathOnHost": "/dev/sda"}]), "HostConfig.Devices"),
        (with_host(PidMode="host"), "HostConfig.PidMode is 'host'"),
        (with_host(NetworkMode="container:abc"), "HostConfig.NetworkMode is 'container:abc'"),
        (with_host(UsernsMode="host"), "HostConfig.UsernsMode is 'host'"),
        (with_host(SecurityOpt=["seccomp=unconfined"]), "SecurityOpt has ['seccomp=unconfined']"),
        (with_host(VolumesFrom=["proxy"]), "HostConfig.VolumesFrom is ['proxy']"),
        (with_host(Binds=["/etc:/host-etc:ro"]), "bind mount of host path '/etc' (at '/host-etc')"),
    ],
)
def test_each_setting_that_reaches_the_host_is_named(inspected: dict[str, Any], words: str) -> None:
    (problem,) = unsafe_settings(inspected)
    assert words in problem


def test_bind_mounts_only_from_the_allowlist_or_inside_it() -> None:
    inspected = {
        **SAFE,
        "Mounts": [
            {"Type": "bind", "Source": "/srv/shared/in", "Destination": "/in"},
            {"Type": "bind", "Source": "/srv/sharedother", "Destination": "/x"},
        ],
    }
    (problem,) = unsafe_settings(inspected, ["/srv/shared"])
    assert "'/srv/sharedother'" in problem and "['/srv/shared']" in problem
    assert unsafe_settings(inspected, ["/srv/shared", "/srv/sharedother/"]) == []


def test_policy_clone_allowlist_is_validated() -> None:
    services = {"w": {"queues": ["q"]}}
    assert parse_policy({"services": services}).clone.allowed_bind_mounts == []
    ok = parse_policy({"clone": {"allowed_bind_mounts": ["/srv/shared"]}, "services": services})
    assert ok.clone.allowed_bind_mounts == ["/srv/shared"]
    with pytest.raises(PolicyError) as err:
        parse_policy(
            {"clone": {"allowed_bind_mounts": ["srv", "/", "/a/../b"]}, "services": services}
        )
    assert len(err.value.problems) == 3
    assert (
        "clone.allowed_bind_mounts.0: 'srv' is invalid: expected an absolute host path"
        in (err.value.problems[0])
    )
    assert "'/' would allow every host path" in err.value.problems[1]


def test_the_stacks_secret_files_are_allowed_from_the_environment_only_as_absolute_paths() -> None:
    """SCALER_CLONE_ALLOWED_BIND_MOUNTS (compose.yaml: the directory of the secret files, which
    every worker binds at /run/secrets) adds to the policy's list; a bad entry stops start-up."""
    secrets = {"Type": "bind", "Source": "/srv/stack/.env.secrets/broker_url_worker",
               "Destination": "/run/secrets/broker_url", "RW": False}  # fmt: skip
    template = {**SAFE, "Mounts": [*SAFE["Mounts"], secrets]}
    allowed = extra_bind_mounts({EXTRA_BIND_MOUNTS_ENV: " /srv/stack/.env.secrets, "})
    assert allowed == ("/srv/stack/.env.secrets",)
    assert unsafe_settings(template, allowed) == []
    assert unsafe_settings(template, ()) != [], "not allowed without it"
    # A sibling whose name merely starts the same is not inside it.
    assert unsafe_settings(template, extra_bind_mounts({EXTRA_BIND_MOUNTS_ENV: "/srv/stack/.env"}))
    assert extra_bind_mounts({}) == ()
    for bad in ("relative/dir", "/", "/srv/../etc"):
        with pytest.raises(ValueError, match=EXTRA_BIND_MOUNTS_ENV):
            extra_bind_mounts({EXTRA_BIND_MOUNTS_ENV: bad})
