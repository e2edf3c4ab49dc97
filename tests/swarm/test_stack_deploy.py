"""compose/stack.yaml on the three-node test swarm, deployed the way a user does: `make swarm-up`.

One deployment (module fixture) with the shipped policy and the Swarm backend, then: every service
converges, the data services sit on the labelled node, the two scalers on two managers, no secret
value appears in any service's spec, one task per queue runs on a Swarm worker and lands in
PostgreSQL, the scaler reaches the engine only through the Swarm allowlist, `make
swarm-dashboard` serves the leader's status on the manager's loopback, and `make swarm-down`
leaves no service, task or network behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cluster import DATA_NODE, NODES, SwarmCluster, docker_cli

if TYPE_CHECKING:
    from conftest import SwarmImages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import ROOT, wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.docker, pytest.mark.slow]

PROXY_IMAGE = os.environ.get("SWARM_PROXY_IMAGE", "celery-stack/docker-proxy:swarm")
WORKERS = {
    "worker-default": "default",
    "worker-cpu": "cpu_intensive",
    "worker-io": "io_intensive",
    "worker-priority": "priority",
    "worker-scheduled": "scheduled",
}
SECRET_NAMES = (
    "REDIS_WORKER_PASSWORD",
    "REDIS_SCALER_PASSWORD",
    "REDIS_ADMIN_PASSWORD",
    "POSTGRES_PASSWORD",
    "POSTGRES_APP_PASSWORD",
    "SCALER_TOKEN",
)
CONVERGE_S = 300
ENCRYPTED = '    driver_opts:\n      encrypted: ""\n'


def unencrypted_copy(directory: Path) -> Path:
    """compose/stack.yaml without its overlays' `encrypted` option.

    The test machine's kernel cannot do the IPsec ESP (AEAD) that encrypted overlays use: the
    nodes' engines log "Failed Adding ... SA ...: function not implemented" and traffic between
    nodes on such a network gets "No route to host". So the cluster runs a copy without it;
    tests/swarm/test_stack_files.py checks that the file itself encrypts all three networks.
    """
    text = (ROOT / "compose/stack.yaml").read_text()
    assert text.count(ENCRYPTED) == 3, "compose/stack.yaml's networks changed: update this copy"
    target = directory / "stack.yaml"
    target.write_text(text.replace(ENCRYPTED, ""))
    return target


@dataclass
class Deployed:
    name: str
    env: dict[str, str]  # the environment `make swarm-*` ran with (DOCKER_HOST: node-1)
    secrets: dict[str, str]  # name -> value, from the env file
    timings: dict[str, float]


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def make(target: str, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", target],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"make {target} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def build_proxy_image() -> str:
    python_image = os.environ.get("PYTHON_IMAGE", "local/python:3.11")
    docker_cli(
        "build", "-q", "--build-arg", f"PYTHON_IMAGE={python_image}",
        "-t", PROXY_IMAGE, str(ROOT / "compose/docker-proxy"),
        timeout=900,
    )  # fmt: skip
    return PROXY_IMAGE


@pytest.fixture(scope="module")
def deployed(
    swarm_cluster: SwarmCluster, swarm_images: SwarmImages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    proxy = swarm_cluster.push(build_proxy_image())
    swarm_cluster.pull(proxy, NODES)
    timings["proxy_image"] = time.monotonic() - t0
    env_file = tmp_path_factory.mktemp("swarm-stack") / ".env"
    subprocess.run(
        ["bash", str(ROOT / "compose/scripts/init-env.sh"), str(ROOT / ".env.example"), env_file],
        check=True,
        capture_output=True,
    )
    name = f"cst{uuid.uuid4().hex[:6]}"
    stack_file = unencrypted_copy(env_file.parent)
    env = swarm_cluster.docker_env(
        env={
            "ENV_FILE": str(env_file),
            "SWARM_STACK": name,
            "APP_IMAGE": swarm_images.app,
            "DOCKER_PROXY_IMAGE": proxy,
            "REDIS_IMAGE": swarm_images.redis,
            "POSTGRES_IMAGE": swarm_images.postgres,
            # `registry` is a name only the nodes resolve: the CLI cannot look up digests.
            "SWARM_RESOLVE_IMAGE": "never",
            "SWARM_STACK_FILE": str(stack_file),
            "SCALER_POLICY_FILE": str(ROOT / "compose/scaler-policy.yaml"),
            # Small pools: three engines share this machine's two cores.
            "IO_CONCURRENCY": "4",
            "CPU_CONCURRENCY": "1",
            "SCALER_HTTP_PORT_HOST": "9100",
        }
    )
    values = read_env_file(env_file)
    deployed = Deployed(name, env, {k: values[k] for k in SECRET_NAMES}, timings)
    try:
        t1 = time.monotonic()
        make("swarm-up", env)
        timings["swarm_up"] = time.monotonic() - t1
        t2 = time.monotonic()
        wait_until(
            f"stack {name} converged", lambda: not unconverged(swarm_cluster, name), CONVERGE_S, 2
        )
        timings["converged"] = time.monotonic() - t2
        print("stack deploy (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        yield deployed
    except BaseException:
        print(swarm_cluster.diagnostics())
        raise
    finally:
        docker_cli("service", "rm", f"{name}_probe", env=env, check=False)
        if swarm_cluster.stack_leftovers(name):
            with_secrets = {**env, "SWARM_REMOVE_SECRETS": "1"}
            subprocess.run(["make", "-s", "swarm-down"], cwd=ROOT, env=with_secrets, check=False,
                           capture_output=True, timeout=600)  # fmt: skip
        ids = docker_cli("secret", "ls", "-q", "--filter", f"label=celery-stack.swarm={name}",
                         env=env, check=False).stdout.split()  # fmt: skip
        if ids:
            docker_cli("secret", "rm", *ids, env=env, check=False)


def exec_in(container: Any, cmd: list[str]) -> tuple[int, str]:
    """``docker exec`` through the SDK: the exit code and the output as text."""
    code, out = container.exec_run(cmd)
    return int(code), out.decode() if isinstance(out, bytes) else ""


def stack_services(cluster: SwarmCluster, name: str) -> dict[str, dict[str, Any]]:
    namespace = {"label": f"com.docker.stack.namespace={name}"}
    services = cluster.live_manager_client().services.list(filters=namespace)
    return {s.name.removeprefix(f"{name}_"): s.attrs for s in services}


def tasks_of(cluster: SwarmCluster, service: str, state: str = "running") -> list[dict[str, Any]]:
    """The service's tasks in ``state`` (running ones only while Swarm still wants them)."""
    tasks = cluster.live_manager_client().api.tasks(filters={"service": service})
    return [
        t
        for t in tasks
        if t["Status"]["State"] == state and (state != "running" or t["DesiredState"] == "running")
    ]


def node_names(cluster: SwarmCluster) -> dict[str, str]:
    return {
        str(n.id): n.attrs["Description"]["Hostname"]
        for n in cluster.live_manager_client().nodes.list()
    }


def unconverged(cluster: SwarmCluster, name: str) -> list[str]:
    """What is not there yet: replicated services short of their replicas (migrate: not complete),
    the global proxy short of one per manager. Empty when the stack has converged."""
    services = stack_services(cluster, name)
    expected = {"docker-proxy", "redis", "postgres", "migrate", "beat", "scaler", *WORKERS}
    missing = [f"service {s} not created" for s in sorted(expected - set(services))]
    for short, attrs in services.items():
        mode = attrs["Spec"]["Mode"]
        full = f"{name}_{short}"
        if short == "migrate":
            if not tasks_of(cluster, full, "complete"):
                missing.append("migrate not complete")
            continue
        want = len(NODES) if "Global" in mode else mode["Replicated"]["Replicas"]
        running = tasks_of(cluster, full)
        # A worker counts once its heartbeat check passed: it waited for the schema and consumes.
        healthy = [t for t in running if _healthy(cluster, t)]
        if len(healthy) != want:
            missing.append(f"{short}: {len(healthy)} of {want} running and healthy")
    return missing


def _healthy(cluster: SwarmCluster, task: dict) -> bool:
    container_id = task["Status"].get("ContainerStatus", {}).get("ContainerID")
    node = node_names(cluster).get(task["NodeID"])
    if not container_id or node is None:
        return False
    state = cluster.client(node).api.inspect_container(container_id)["State"]
    return state.get("Health", {}).get("Status", "healthy") == "healthy"


def test_every_service_converges_where_it_belongs(
    swarm_cluster: SwarmCluster, deployed: Deployed
) -> None:
    name = deployed.name
    assert not unconverged(swarm_cluster, name)
    nodes = node_names(swarm_cluster)
    for data_service in ("redis", "postgres", "beat"):
        (task,) = tasks_of(swarm_cluster, f"{name}_{data_service}")
        assert nodes[task["NodeID"]] == DATA_NODE, f"{data_service} runs on {nodes[task['NodeID']]}"
    scalers = tasks_of(swarm_cluster, f"{name}_scaler")
    assert len({nodes[t["NodeID"]] for t in scalers}) == 2, "the two scalers share a node"
    services = stack_services(swarm_cluster, name)
    for worker in WORKERS:
        spec = services[worker]["Spec"]
        assert spec["Labels"]["autoscale.managed"] == "true"
        assert spec["TaskTemplate"]["RestartPolicy"]["Condition"] == "on-failure"
        assert "Hostname" not in spec["TaskTemplate"]["ContainerSpec"]


def test_no_service_holds_a_secret_value(swarm_cluster: SwarmCluster, deployed: Deployed) -> None:
    services = stack_services(swarm_cluster, deployed.name)
    assert len(services) == 11
    for short, attrs in services.items():
        spec = json.dumps(attrs["Spec"])
        leaked = [k for k, v in deployed.secrets.items() if v and v in spec]
        assert not leaked, f"{short}'s service spec contains the value of {leaked}"
        env = attrs["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env", [])
        assert not [e for e in env if "PASSWORD=" in e or "_URL=" in e], f"{short}: {env}"


def test_one_task_per_queue_lands_in_postgres(
    swarm_cluster: SwarmCluster, deployed: Deployed
) -> None:
    name, env = deployed.name, deployed.env
    secrets = [
        f"source={name}_{src},target={dst},uid=10001,gid=10001,mode=0400"
        for src, dst in (
            ("broker_url_worker", "broker_url"),
            ("result_backend_worker", "result_backend"),
            ("database_url_app", "database_url"),
        )
    ]
    docker_cli(
        "service", "create", "--detach", "--name", f"{name}_probe", "--network", f"{name}_backend",
        "--restart-condition", "none", "--user", "10001:10001",
        *[arg for s in secrets for arg in ("--secret", s)],
        "-e", "CELERY_BROKER_URL_FILE=/run/secrets/broker_url",
        "-e", "CELERY_RESULT_BACKEND_FILE=/run/secrets/result_backend",
        "-e", "DATABASE_URL_FILE=/run/secrets/database_url",
        deployed.env["APP_IMAGE"],
        "python", "-m", "services.load", "--queue", "all", "--count", "1",
        "--duration", "0.1", "--size", "100",
        env=env,
    )  # fmt: skip
    wait_until(
        "the probe sent its tasks",
        lambda: tasks_of(swarm_cluster, f"{name}_probe", "complete"),
        180,
        1,
    )
    (postgres,) = tasks_of(swarm_cluster, f"{name}_postgres")
    container = swarm_cluster.client(DATA_NODE).containers.get(
        postgres["Status"]["ContainerStatus"]["ContainerID"]
    )

    def effects() -> dict[str, str]:
        sql = "SELECT queue, hostname FROM task_effects"
        code, out = exec_in(
            container,
            [
                "psql",
                "-h",
                "/var/run/postgresql",
                "-p",
                "5432",
                "-U",
                "celery",
                "-d",
                "celery",
                "-Atc",
                sql,
            ],
        )
        assert code == 0, out
        rows = [line.split("|", 1) for line in out.splitlines() if "|" in line]
        return {queue: host for queue, host in rows}

    got = wait_until(
        "an effect of each queue's task",
        lambda: len(effects()) >= len(WORKERS) and effects(),
        180,
        1,
    )
    assert set(got) >= set(WORKERS.values())
    for service, queue in WORKERS.items():
        # The worker's Celery hostname is Swarm's default: its container's short id.
        containers = {
            t["Status"]["ContainerStatus"]["ContainerID"][:12]
            for t in tasks_of(swarm_cluster, f"{name}_{service}")
        }
        assert got[queue] in containers, f"{queue}'s effect came from {got[queue]}, not {service}"


def test_the_scaler_reaches_only_the_swarm_allowlist(
    swarm_cluster: SwarmCluster, deployed: Deployed
) -> None:
    nodes = node_names(swarm_cluster)
    task = tasks_of(swarm_cluster, f"{deployed.name}_scaler")[0]
    container = swarm_cluster.client(nodes[task["NodeID"]]).containers.get(
        task["Status"]["ContainerStatus"]["ContainerID"]
    )
    probe = (
        "import docker, sys\n"
        "c = docker.from_env()\n"
        "assert c.services.list(), 'no services listed'\n"
        "try:\n"
        "    c.containers.list()\n"
        "except docker.errors.APIError as e:\n"
        "    print(e.response.status_code, e.explanation)\n"
        "else:\n"
        "    sys.exit('container list allowed')\n"
    )
    code, out = exec_in(container, ["python", "-c", probe])
    assert code == 0, out
    assert out.startswith("403 docker-proxy:"), out


def test_the_dashboard_forwards_the_leaders_status(
    swarm_cluster: SwarmCluster, deployed: Deployed
) -> None:
    make("swarm-dashboard", deployed.env)
    request = (
        "exec 3<>/dev/tcp/127.0.0.1/9100"
        " && printf 'GET /status HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    )

    def leader_status() -> str | None:
        # The manager's own loopback: a shell inside node-1 (the node DOCKER_HOST names).
        node = swarm_cluster.container(NODES[0])
        out = docker_cli("exec", node, "bash", "-c", request, check=False).stdout
        ok = out.startswith("HTTP/1.") and " 200 " in out.splitlines()[0]
        # Until its health checks find the leader, the forwarder falls back to either scaler.
        return out if ok and '"role":"leader"' in out.replace(" ", "") else None

    try:
        status = wait_until(
            "the leader's /status on the manager's 127.0.0.1:9100", leader_status, 120, 1
        )
        assert '"role":"leader"' in status.replace(" ", ""), status[-2000:]
    finally:
        docker_cli("rm", "-f", f"{deployed.name}-dashboard", env=deployed.env, check=False)


def scalers(cluster: SwarmCluster, name: str) -> dict[str, tuple[str, str, Any]]:
    """Running scaler tasks: task id -> (node, role from its own `scaler status`, container)."""
    nodes = node_names(cluster)
    found: dict[str, tuple[str, str, Any]] = {}
    for task in tasks_of(cluster, f"{name}_scaler"):
        node = nodes.get(task["NodeID"], "")
        try:
            container = cluster.client(node).containers.get(
                task["Status"]["ContainerStatus"]["ContainerID"]
            )
            code, out = exec_in(container, ["scaler", "status", "--json"])
        except Exception:
            continue  # its node is going away, or it is still starting
        if code == 0:
            found[task["ID"]] = (node, str(json.loads(out).get("role")), container)
    return found


def io_effects_since(cluster: SwarmCluster, name: str, since: str) -> int:
    """io_intensive effects written after ``since`` (a PostgreSQL timestamp), counted there."""
    (postgres,) = tasks_of(cluster, f"{name}_postgres")
    container = cluster.client(DATA_NODE).containers.get(
        postgres["Status"]["ContainerStatus"]["ContainerID"]
    )
    sql = (
        f"SELECT count(*) FROM task_effects WHERE queue = 'io_intensive' AND created_at > '{since}'"
    )
    psql = ["psql", "-h", "/var/run/postgresql", "-p", "5432", "-U", "celery", "-d", "celery"]
    code, out = exec_in(container, [*psql, "-Atc", sql])
    assert code == 0, out
    return int(out.strip())


def send_io_burst(deployed: Deployed, probe: str, count: int, duration: float) -> None:
    """`services.load` from a one-off service on the stack's network, as the worker user."""
    secrets = [
        f"source={deployed.name}_{src},target={dst},uid=10001,gid=10001,mode=0400"
        for src, dst in (("broker_url_worker", "broker_url"),
                         ("result_backend_worker", "result_backend"),
                         ("database_url_app", "database_url"))
    ]  # fmt: skip
    docker_cli(
        "service", "create", "--detach", "--name", probe, "--network", f"{deployed.name}_backend",
        "--restart-condition", "none", "--user", "10001:10001",
        *[arg for s in secrets for arg in ("--secret", s)],
        "-e", "CELERY_BROKER_URL_FILE=/run/secrets/broker_url",
        "-e", "CELERY_RESULT_BACKEND_FILE=/run/secrets/result_backend",
        "-e", "DATABASE_URL_FILE=/run/secrets/database_url",
        deployed.env["APP_IMAGE"],
        "python", "-m", "services.load", "--queue", "io_intensive", "--count", str(count),
        "--duration", str(duration),
        env=deployed.env,
    )  # fmt: skip


def test_a_burst_scales_across_nodes_and_the_standby_leads_when_the_leaders_node_stops(
    swarm_cluster: SwarmCluster, deployed: Deployed
) -> None:
    """The shipped policy (worker-io: 32 tasks per replica, 30 s down window) on the deployed
    stack: a burst scales worker-io over several nodes; the leader scaler's node is killed
    mid-burst; the standby leads, every task of the burst has its effect, and worker-io comes
    back to one replica. Redis and PostgreSQL live on the data node, which is never stopped:
    when the leader runs there, it is killed first so that the lead moves to another node."""
    name, cluster = deployed.name, swarm_cluster

    def roles() -> dict[str, tuple[str, str, Any]] | None:
        found = scalers(cluster, name)
        return found if sorted(r for _, r, _ in found.values()) == ["leader", "standby"] else None

    found = wait_until("a leader and a standby scaler", roles, 180, 2)
    leader = next(t for t, (_, role, _) in found.items() if role == "leader")
    if found[leader][0] == DATA_NODE:
        found[leader][2].kill()  # Swarm starts another; the standby leads after the lease
        found = wait_until(
            "a leader off the data node",
            lambda: (r := roles()) and any(n != DATA_NODE and role == "leader"
                                          for n, role, _ in r.values()) and r,
            180, 2,
        )  # fmt: skip
        leader = next(t for t, (_, role, _) in found.items() if role == "leader")
    leader_node = found[leader][0]
    code, since = exec_in(found[leader][2], ["date", "-u", "+%Y-%m-%d %H:%M:%S"])
    assert code == 0, since
    probe = f"{name}_burst"
    count = 120  # 120 tasks of 8 s: 4 replicas of 4 threads take a minute
    send_io_burst(deployed, probe, count, 8.0)
    try:
        service = f"{name}_worker-io"
        spread = wait_until(
            "worker-io scaled up over two nodes or more",
            lambda: len({t["NodeID"] for t in tasks_of(cluster, service)}) >= 2
            and len(tasks_of(cluster, service)) >= 3,
            180, 1,
        )  # fmt: skip
        assert spread
        cluster.stop_node(leader_node)
        try:
            survivor = wait_until(
                "the standby leads",
                lambda: (r := scalers(cluster, name)) and [
                    (n, c) for t, (n, role, c) in r.items() if role == "leader" and t != leader
                ],
                120, 2,
            )  # fmt: skip
            wait_until(f"all {count} io tasks done", lambda: io_effects_since(
                cluster, name, since.strip()) >= count, 300, 2)  # fmt: skip
            assert io_effects_since(cluster, name, since.strip()) == count
            wait_until("worker-io back at one replica", lambda: len(tasks_of(cluster, service))
                       == 1, 180, 2)  # fmt: skip
            logs = survivor[0][1].logs().decode(errors="replace")
            assert "swarm-removed-another" not in logs, logs[-3000:]
            assert '"drained' in logs or " drained: " in logs, logs[-3000:]
        finally:
            cluster.start_node(leader_node)
            # The killed engine's task containers are still on its disk when it comes back
            # (exited, of tasks Swarm has since replaced elsewhere): a machine's crash leaves
            # them too. Removed here so that swarm-down's check sees only what it made.
            cluster.client(leader_node).containers.prune(
                filters={"label": f"com.docker.stack.namespace={name}"}
            )
    finally:
        docker_cli("service", "rm", probe, env=deployed.env, check=False)


def test_swarm_down_leaves_nothing(swarm_cluster: SwarmCluster, deployed: Deployed) -> None:
    docker_cli("service", "rm", f"{deployed.name}_probe", env=deployed.env, check=False)
    probe = {"name": f"{deployed.name}_probe"}
    wait_until(
        "the probe service gone",
        lambda: not swarm_cluster.live_manager_client().services.list(filters=probe),
        60,
        1,
    )
    t0 = time.monotonic()
    make("swarm-down", {**deployed.env, "SWARM_REMOVE_SECRETS": "1"})
    deployed.timings["swarm_down"] = time.monotonic() - t0
    left: list[str] = []

    def nothing_left() -> bool:
        left[:] = swarm_cluster.stack_leftovers(deployed.name)
        return not left

    try:
        wait_until("no leftovers", nothing_left, 120, 1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {left}") from None
    label = f"label=celery-stack.swarm={deployed.name}"
    left = docker_cli("secret", "ls", "-q", "--filter", label, env=deployed.env).stdout.split()
    assert not left, f"secrets left: {left}"
    print(f"swarm-down {deployed.timings['swarm_down']:.1f} s")
