"""Redis, PostgreSQL and a worker service for the Swarm backend's tests, on the test cluster.

Redis and PostgreSQL run as plain containers of the host engine on the cluster's own bridge
network: the tests on the host reach them by address, and so do the workers inside the nodes
(their traffic leaves each node through its NAT onto that network). The worker service is made
the way ``docker stack deploy`` makes compose/stack.yaml's (stack and opt-in labels, a warm
shutdown on SIGTERM behind tini, ``restart_policy: on-failure``, the shipped grace period), so
the backend under test meets what it meets in a deployed stack.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from cluster import LABEL, SwarmCluster, docker_cli
from docker.types import EndpointSpec, Resources, RestartPolicy, ServiceMode

from scaler.backends.swarm import MANAGED_LABEL, STACK_LABEL
from services.application import ServiceApp, create_app
from services.config import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import wait_until

ROOT = Path(__file__).resolve().parents[2]
# As compose.yaml ships it: longer than the task time limit, so a warm shutdown finishes tasks.
STOP_GRACE_S = 150


@dataclass
class Backing:
    """Redis and PostgreSQL for one module's tests, and a client app to them."""

    cluster: SwarmCluster
    redis_ip: str
    postgres_ip: str
    containers: list[str]
    apps: list[ServiceApp] = field(default_factory=list)

    @property
    def broker_url(self) -> str:
        return f"redis://{self.redis_ip}:6379/0"

    @property
    def records_url(self) -> str:
        """Where the workers record their runs (the result backend, as shipped)."""
        return f"redis://{self.redis_ip}:6379/1"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres:swarm-test@{self.postgres_ip}:5432/celery"

    def worker_env(self, queue: str, pool: str, concurrency: int) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_RESULT_BACKEND": self.records_url,
            "DATABASE_URL": self.database_url,
            "WORKER_QUEUE": queue,
            "WORKER_POOL": pool,
            "WORKER_CONCURRENCY": str(concurrency),
            "WORKER_HEARTBEAT_FILE": "/tmp/celery-worker.heartbeat",
        }

    def app(self) -> ServiceApp:
        settings = load_settings(
            {
                "CELERY_BROKER_URL": self.broker_url,
                "CELERY_RESULT_BACKEND": self.records_url,
                "DATABASE_URL": self.database_url,
            }
        )
        app = create_app(settings, main="swarm-test-client")
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in self.apps:
            app.close()
        if self.containers:
            docker_cli("rm", "-f", *self.containers, check=False)
            docker_cli("volume", "prune", "-f", "--filter", f"label={LABEL}=1", check=False)


def _ip(container: str, network: str) -> str:
    proc = docker_cli(
        "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
        container,
    )  # fmt: skip
    return proc.stdout.strip()


def start_backing(cluster: SwarmCluster) -> Backing:
    """Redis and PostgreSQL on the cluster's network, the schema migrated."""
    prefix = f"{cluster.prefix}-backing-{uuid.uuid4().hex[:4]}"
    labels = ["--label", f"{LABEL}=1"]
    redis_name, pg_name = f"{prefix}-redis", f"{prefix}-postgres"
    backing = Backing(cluster, "", "", [])
    try:
        docker_cli("run", "-d", "--name", redis_name, "--network", cluster.network, *labels,
                   os.environ.get("REDIS_IMAGE", "local/redis:7"), "redis-server", "--save", "",
                   "--appendonly", "no", "--protected-mode", "no")  # fmt: skip
        backing.containers.append(redis_name)
        docker_cli("run", "-d", "--name", pg_name, "--network", cluster.network, *labels,
                   "-e", "POSTGRES_PASSWORD=swarm-test", "-e", "POSTGRES_DB=celery",
                   os.environ.get("POSTGRES_IMAGE", "local/postgres:15"))  # fmt: skip
        backing.containers.append(pg_name)
        backing.redis_ip = _ip(redis_name, cluster.network)
        backing.postgres_ip = _ip(pg_name, cluster.network)
        env = {**os.environ, "DATABASE_URL": backing.database_url,
               "CELERY_BROKER_URL": backing.broker_url}  # fmt: skip
        env.pop("POSTGRES_APP_PASSWORD", None)
        subprocess.run([sys.executable, "-m", "services.migrate"], env=env, cwd=ROOT,
                       check=True, capture_output=True, text=True, timeout=180)  # fmt: skip
    except BaseException:
        backing.close()
        raise
    return backing


def create_worker_service(
    client: docker.DockerClient,
    *,
    stack: str,
    name: str,
    image: str,
    env: dict[str, str],
    replicas: int,
) -> Any:
    """A worker service as `docker stack deploy` makes one of compose/stack.yaml's.

    The CLI always sends a placement and a DNS config, empty or not; the SDK leaves them out,
    and the engine fills them in at the first update, which makes Swarm replace the tasks
    started before it (a rolling update). So the service gets one update with its own count
    here, before any task runs: from then on its spec reads back as it was written, as a
    stack's does. (The backend reports a count change that stopped a task it did not drain.)"""
    service = client.services.create(
        image,
        command=["start-worker.sh"],
        name=f"{stack}_{name}",
        env=[f"{k}={v}" for k, v in env.items()],
        labels={STACK_LABEL: stack, MANAGED_LABEL: "true"},
        container_labels={STACK_LABEL: stack},
        restart_policy=RestartPolicy(condition="on-failure", delay=1_000_000_000),
        stop_grace_period=STOP_GRACE_S * 1_000_000_000,
        stop_signal="SIGTERM",
        init=True,
        mode=ServiceMode("replicated", replicas=replicas),
        # As compose/stack.yaml's worker-io: dnsrr (no IPVS on these machines), limits and
        # reservations.
        endpoint_spec=EndpointSpec(mode="dnsrr"),
        resources=Resources(
            cpu_limit=1_000_000_000,
            mem_limit=768 * 2**20,
            cpu_reservation=100_000_000,
            mem_reservation=128 * 2**20,
        ),
    )
    spec = client.api.inspect_service(service.id)
    client.api.update_service(service.id, spec["Version"]["Index"],
                              mode=ServiceMode("replicated", replicas=replicas),
                              fetch_current_spec=True)  # fmt: skip
    service.reload()
    return service


def wait_answering(app: Any, count: int, deadline_s: float = 120) -> list[str]:
    """Poll pings until ``count`` workers answer; their node names."""

    def answering() -> list[str] | None:
        nodes = sorted(n for reply in app.control.ping(timeout=1.0) or [] for n in reply)
        return nodes if len(nodes) == count else None

    found: list[str] = wait_until(f"{count} workers answering", answering, deadline_s=deadline_s)
    return found
