"""Smoke tests of the shared three-node swarm: what every Swarm backend test relies on.

Three Ready managers; a service from the pushed app image spreads one task per node, each pulled
from the test registry; an overlay network carries traffic between tasks on two nodes by service
name; a stopped node is reported down while the other two keep the control plane, and comes back
Ready when started. Each test removes what it creates, so later tests find an empty cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import docker
import pytest
from cluster import DATA_NODE, NODES, SwarmCluster, SwarmImages, split_reference, wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def cleanup_services(swarm_cluster: SwarmCluster) -> Iterator[list[str]]:
    """Names of services (then networks, prefixed ``net:``) to remove after the test, waited."""
    names: list[str] = []
    yield names
    manager = swarm_cluster.live_manager_client()
    services = [n for n in names if not n.startswith("net:")]
    for name in services:
        for service in manager.services.list(filters={"name": name}):
            service.remove()

    def tasks_gone() -> bool:
        return not any(
            swarm_cluster.client(node).containers.list(
                all=True, filters={"label": f"com.docker.swarm.service.name={name}"}
            )
            for node in NODES
            for name in services
        )

    wait_until("the smoke services' containers removed on every node", tasks_gone, 90)
    for name in names:
        if name.startswith("net:"):
            manager.networks.get(name[4:]).remove()


def running_tasks(cluster: SwarmCluster, service_name: str) -> list[dict[str, object]]:
    """The service's tasks that are running now, per the swarm."""
    service = cluster.manager_client().services.get(service_name)
    return [
        t
        for t in service.tasks(filters={"desired-state": "running"})
        if t["Status"]["State"] == "running"
    ]


def test_three_managers_ready_and_data_node_labelled(swarm_cluster: SwarmCluster) -> None:
    assert swarm_cluster.node_states() == dict.fromkeys(NODES, ("ready", "reachable"))
    manager = swarm_cluster.manager_client()
    leaders = [n for n in manager.nodes.list() if n.attrs["ManagerStatus"].get("Leader")]
    assert len(leaders) == 1
    data = manager.nodes.get(DATA_NODE).attrs["Spec"].get("Labels", {})
    assert data.get("celery.data") == "true"
    others = [manager.nodes.get(n).attrs["Spec"].get("Labels", {}) for n in NODES[1:]]
    assert all("celery.data" not in labels for labels in others)


def test_replicated_service_spreads_from_registry_and_overlay_carries_traffic(
    swarm_cluster: SwarmCluster, swarm_images: SwarmImages, cleanup_services: list[str]
) -> None:
    manager = swarm_cluster.manager_client()
    uid = uuid.uuid4().hex[:6]
    network, spread, echo = f"smoke-net-{uid}", f"smoke-spread-{uid}", f"smoke-echo-{uid}"
    manager.networks.create(network, driver="overlay")
    cleanup_services.append(f"net:{network}")
    cleanup_services += [spread, echo]
    manager.services.create(
        swarm_images.app,
        command=["sleep", "infinity"],
        init=True,  # tini: SIGTERM ends sleep at once instead of after the 10 s stop grace
        name=spread,
        mode=docker.types.ServiceMode("replicated", replicas=3),
        maxreplicas=1,
        networks=[network],
    )
    # The server on node-2 only, so a client on node-3 must cross the overlay to reach it. DNS
    # round robin: this kernel has no IPVS, so a service's virtual IP (the default) never answers.
    manager.services.create(
        swarm_images.app,
        command=["python", "-m", "http.server", "8000"],
        init=True,
        name=echo,
        constraints=["node.hostname==node-2"],
        networks=[network],
        endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
    )

    def three_running() -> list[dict[str, object]] | None:
        tasks = running_tasks(swarm_cluster, spread)
        return tasks if len(tasks) == 3 else None

    tasks = wait_until(f"{spread}: three tasks running", three_running, 120)
    hostnames = {n.id: n.attrs["Description"]["Hostname"] for n in manager.nodes.list()}
    assert sorted(hostnames[str(t["NodeID"])] for t in tasks) == sorted(NODES)

    repo, _ = split_reference(swarm_images.app.split("/", 1)[1])
    for node in NODES:
        containers = swarm_cluster.client(node).containers.list(
            filters={"label": f"com.docker.swarm.service.name={spread}"}
        )
        assert len(containers) == 1, f"{node} runs {len(containers)} tasks of {spread}"
        image = containers[0].image
        assert image is not None
        # A digest from the registry: the node pulled this image from registry:5000, not a load.
        digests = image.attrs["RepoDigests"]
        assert any(d.startswith(f"registry:5000/{repo}@sha256:") for d in digests), digests

    client_task = swarm_cluster.client("node-3").containers.list(
        filters={"label": f"com.docker.swarm.service.name={spread}"}
    )[0]
    probe = (
        "import urllib.request; "
        f"print(urllib.request.urlopen('http://{echo}:8000/', timeout=5).status)"
    )

    def reaches_echo() -> bool:
        result = client_task.exec_run(["python", "-c", probe])
        output = result.output if isinstance(result.output, bytes) else b""
        return result.exit_code == 0 and output.decode().strip() == "200"

    wait_until(f"a {spread} task on node-3 reaches {echo} on node-2 by name", reaches_echo, 90)
    echo_tasks = running_tasks(swarm_cluster, echo)
    assert [hostnames[str(t["NodeID"])] for t in echo_tasks] == ["node-2"]


def test_stopped_node_is_down_while_quorum_holds_and_comes_back_ready(
    swarm_cluster: SwarmCluster,
) -> None:
    node = "node-3"
    swarm_cluster.stop_node(node)
    try:
        swarm_cluster.wait_node_state(node, "down", 60)
        # Two managers of three still elect a leader: the control plane answers and acts.
        states = swarm_cluster.node_states()
        assert states["node-1"] == ("ready", "reachable")
        assert states["node-2"] == ("ready", "reachable")
        assert states[node][0] == "down"
    finally:
        swarm_cluster.start_node(node, 120)
    swarm_cluster.wait_ready(60)
    assert swarm_cluster.node_states()[node] == ("ready", "reachable")


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("", "''"),
        ("registry.example.com/app:1", "registry.example.com"),
        ("localhost:5000/app", "localhost:5000"),
        ("app@sha256:" + "0" * 64, "app@sha256"),
    ],
)
def test_push_refuses_references_it_cannot_map(bad: str, named: str) -> None:
    with pytest.raises(ValueError, match="local_tag") as err:
        split_reference(bad)
    assert named in str(err.value)


def test_unknown_node_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'node-9' is not one of node-1, node-2, node-3"):
        SwarmCluster(run_id="x").container("node-9")


def test_reference_split() -> None:
    assert split_reference("celery-stack/app:swarm") == ("celery-stack/app", "swarm")
    assert split_reference("local/redis") == ("local/redis", "latest")
