"""A throwaway three-node Docker Swarm on this one machine, for the Swarm backend's tests.

Each node is a Docker-in-Docker container of ``local/swarm-node:bookworm`` (node.Dockerfile)
started as docs/environment.md's recipe says: no ``--privileged`` (this VM's root lacks
CAP_SYS_RESOURCE, which ``--privileged`` asks for), every other capability, seccomp, AppArmor and
the system paths unconfined, the host's cgroup namespace with /sys/fs/cgroup bound read-write,
a tmpfs /run and a volume for /var/lib/docker. Each node's engine puts its containers under a
cgroup parent of its own (``/<node container name>``) so they never mix with the host engine's;
teardown removes those directories.

SECURITY: each node's engine also listens on **tcp://0.0.0.0:2375 without TLS or auth**, so that
tests on the host can drive it with the Docker SDK and the docker CLI. That port is root on the
node. It exists only on the test's own bridge network (never published on the host) for the
length of a test run on this machine; do not copy this setup anywhere else.

All three nodes are managers (node-1 inits, the others join with the manager token), so the swarm
keeps its quorum (2 of 3) when one node is stopped. A registry (Debian's docker-registry from the
same image, alias ``registry`` on the network, plain HTTP, no auth) serves images to the nodes as
``registry:5000/<repo>:<tag>``; the host pushes to it through 127.0.0.1:<port> with uncompressed
layers (registry_push.py: ``docker push`` gzips on one core and took 72 s for the app image).
Every container, network and volume carries the label
``cst-swarm-test=1`` so CI's cleanup finds whatever a crashed run leaves behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import wait_until
from registry_push import RegistryClient, Target, push_images

__all__ = ["NODES", "SwarmCluster", "SwarmImages", "split_reference", "wait_until"]

HERE = Path(__file__).resolve().parent
NODE_IMAGE = os.environ.get("SWARM_NODE_IMAGE", "local/swarm-node:bookworm")
NODE_BASE_IMAGE = "local/debian-base:bookworm"
NODE_DOCKERFILE = HERE / "node.Dockerfile"
REGISTRY_CONFIG = HERE / "registry.yml"
NODES = ("node-1", "node-2", "node-3")
DATA_NODE = "node-1"  # labelled celery.data=true: the stack pins Redis and PostgreSQL there
LABEL = "cst-swarm-test"
RUN_LABEL = "cst-swarm-run"
NAME_PREFIX = "cst-swarm-"
REGISTRY_ALIAS = "registry"
REGISTRY_PORT = 5000
ENGINE_PORT = 2375
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Every capability this engine knows (it knows none past AUDIT_READ) except SYS_RESOURCE, which
# this VM's root does not hold: asking for it (as --privileged does) fails "unable to apply caps".
NODE_CAPS = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE",
    "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
)  # fmt: skip
# Agents heartbeat every 2 s instead of 5 s, so a stopped node is reported down within seconds
# (tests that stop a node wait for that); still well above what a loaded 2-core machine needs.
HEARTBEAT_NS = 2_000_000_000
T = TypeVar("T")


@dataclass(frozen=True)
class SwarmImages:
    """The names the nodes pull the stack's images by (registry:5000/<repo>:<tag>)."""

    app: str
    redis: str
    postgres: str


def docker_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the host's docker CLI; on failure raise with the command and its stderr."""
    cmd = ["docker", *args]
    proc = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc


def node_image_hash() -> str:
    """A digest of what the node image is built from, so an edited Dockerfile rebuilds it."""
    digest = hashlib.sha256()
    for path in (NODE_DOCKERFILE, REGISTRY_CONFIG):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_node_image() -> bool:
    """Build ``local/swarm-node:bookworm`` when missing or stale; True when it was built."""
    want = node_image_hash()
    proc = docker_cli(
        "image", "inspect", "-f", '{{ index .Config.Labels "cst-swarm-node.hash" }}', NODE_IMAGE,
        check=False,
    )  # fmt: skip
    if proc.returncode == 0 and proc.stdout.strip() == want:
        return False
    docker_cli(
        "build", "-q", "-f", str(NODE_DOCKERFILE), "-t", NODE_IMAGE,
        "--build-arg", f"BASE_IMAGE={NODE_BASE_IMAGE}",
        "--label", f"cst-swarm-node.hash={want}",
        str(HERE),
        timeout=900,
    )  # fmt: skip
    return True


def split_reference(local_tag: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); digests and registry-qualified names are refused."""
    if not local_tag or "@" in local_tag or any(c.isspace() for c in local_tag):
        raise ValueError(f"push: local_tag {local_tag!r} is not a repo[:tag] image reference")
    repo, sep, tag = local_tag.rpartition(":")
    if not sep or "/" in tag:
        repo, tag = local_tag, "latest"
    first = repo.split("/", 1)[0]
    if "/" in repo and ("." in first or ":" in first or first == "localhost"):
        raise ValueError(
            f"push: local_tag {local_tag!r} names a registry ({first!r}); give a local repo[:tag]"
        )
    return repo, tag


def _parallel(fn: Callable[[str], T], items: Iterable[str]) -> dict[str, T]:
    """Run ``fn`` over ``items`` in threads; every result, or the first failure raised."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        futures = {item: pool.submit(fn, item) for item in items}
        return {item: future.result() for item, future in futures.items()}


class SwarmCluster:
    """Three Docker-in-Docker swarm managers and a registry on a bridge network of their own.

    ``with SwarmCluster() as cluster:`` starts it and tears it down (even on failure); or call
    ``start()`` and ``teardown()``. ``timings`` holds the measured seconds of each phase.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.prefix = f"{NAME_PREFIX}{self.run_id}"
        self.network = self.prefix
        self.registry_container = f"{self.prefix}-registry"
        self.registry_volume = f"{self.prefix}-registry"
        self.registry_host_port: int | None = None
        self.timings: dict[str, float] = {}
        self._ips: dict[str, str] = {}
        self._clients: dict[str, docker.DockerClient] = {}
        self._clients_lock = threading.Lock()
        self._pushed: dict[str, str] = {}
        self._push_lock = threading.Lock()

    # -- names ----------------------------------------------------------------------------------

    def container(self, node: str) -> str:
        """The host container that is ``node``."""
        self._check_node(node)
        return f"{self.prefix}-{node}"

    def cgroup_parent(self, node: str) -> str:
        """The cgroup (under every hierarchy's root) the node's engine puts its containers in."""
        return self.container(node)

    def node_ip(self, node: str) -> str:
        """The node's address on the test network (fixed: it survives a stop and start)."""
        self._check_node(node)
        return self._ips[node]

    def _check_node(self, node: str) -> None:
        if node not in NODES:
            raise ValueError(f"node {node!r} is not one of {', '.join(NODES)}")

    def _labels(self) -> list[str]:
        return ["--label", f"{LABEL}=1", "--label", f"{RUN_LABEL}={self.run_id}"]

    # -- start ----------------------------------------------------------------------------------

    def __enter__(self) -> SwarmCluster:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.teardown()
        if problems and exc is None:
            raise RuntimeError("swarm cluster teardown left things behind:\n" + "\n".join(problems))

    def start(self, deadline_s: float = 180) -> None:
        """Network, registry, three engines (started together), a three-manager swarm."""
        started = time.monotonic()
        self.timings["node_image_built"] = float(ensure_node_image())
        self.timings["node_image"] = time.monotonic() - started
        t0 = time.monotonic()
        self._create_network()
        docker_cli("volume", "create", *self._labels(), self.registry_volume)
        for node in NODES:
            docker_cli("volume", "create", *self._labels(), self.container(node))
        self._run_registry()
        _parallel(self._run_node, NODES)
        _parallel(lambda node: self._wait_engine(node, deadline_s), NODES)
        self.timings["engines_up"] = time.monotonic() - t0
        t1 = time.monotonic()
        self._form_swarm()
        self.wait_ready(deadline_s)
        self.run_on(DATA_NODE, "node", "update", "--label-add", "celery.data=true", DATA_NODE)
        self.timings["swarm_formed"] = time.monotonic() - t1
        self._wait_registry(deadline_s)
        self.timings["cluster_up"] = time.monotonic() - t0

    def _create_network(self) -> None:
        """A bridge network with a subnet of our own choosing, so nodes keep fixed addresses.

        Docker picks a free subnet for a network created plainly; that network is replaced by one
        with the same subnet given explicitly, which ``--ip`` requires. Dynamic addresses (the
        registry's) come from the upper half only, the nodes take .10 to .12 of the lower half.
        """
        last: Exception | None = None
        for _ in range(5):
            docker_cli("network", "create", *self._labels(), self.network)
            out = docker_cli(
                "network", "inspect", "-f", "{{ (index .IPAM.Config 0).Subnet }}", self.network
            ).stdout.strip()
            docker_cli("network", "rm", self.network)
            subnet = ipaddress.ip_network(out)
            upper = list(subnet.subnets(prefixlen_diff=1))[1]
            proc = docker_cli(
                "network", "create", *self._labels(), "--driver", "bridge",
                "--subnet", str(subnet), "--ip-range", str(upper), self.network,
                check=False,
            )  # fmt: skip
            if proc.returncode == 0:
                hosts = subnet.hosts()
                addresses = [str(next(hosts)) for _ in range(12)][9:12]
                self._ips = dict(zip(NODES, addresses, strict=True))
                return
            last = RuntimeError(proc.stderr.strip())  # another run took the subnet meanwhile
        raise RuntimeError(f"could not create the swarm test network {self.network}: {last}")

    def _run_registry(self) -> None:
        docker_cli(
            "run", "-d", "--name", self.registry_container, *self._labels(),
            "--network", self.network, "--network-alias", REGISTRY_ALIAS,
            "-p", f"127.0.0.1::{REGISTRY_PORT}",
            "-v", f"{self.registry_volume}:/var/lib/registry",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            NODE_IMAGE, "docker-registry", "serve", "/etc/swarm-node/registry.yml",
        )  # fmt: skip
        out = docker_cli("port", self.registry_container, f"{REGISTRY_PORT}/tcp").stdout
        self.registry_host_port = int(out.splitlines()[0].rsplit(":", 1)[1])

    def _node_run_args(self, node: str) -> list[str]:
        caps = [arg for cap in NODE_CAPS for arg in ("--cap-add", cap)]
        return [
            "run", "-d", "--name", self.container(node), "--hostname", node, *self._labels(),
            "--network", self.network, "--ip", self._ips[node], "--network-alias", node,
            *caps,
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--security-opt", "systempaths=unconfined",
            "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--tmpfs", "/run", "-v", f"{self.container(node)}:/var/lib/docker",
            # tini as PID 1 reaps the engine's orphaned shims; SIGTERM still reaches dockerd.
            "--init",
            NODE_IMAGE,
            "dockerd", "--host", "unix:///var/run/docker.sock",
            "--host", f"tcp://0.0.0.0:{ENGINE_PORT}", "--tls=false",
            f"--cgroup-parent=/{self.cgroup_parent(node)}",
            "--insecure-registry", f"{REGISTRY_ALIAS}:{REGISTRY_PORT}",
        ]  # fmt: skip

    def _run_node(self, node: str) -> None:
        docker_cli(*self._node_run_args(node))

    def _wait_engine(self, node: str, deadline_s: float) -> None:
        def up() -> bool:
            if not self._running(node):
                logs = docker_cli("logs", "--tail", "30", self.container(node), check=False)
                raise RuntimeError(f"{node} exited:\n{logs.stdout}{logs.stderr}")
            return bool(self.client(node).ping())

        try:
            wait_until(f"{node}'s engine answers on {self.node_ip(node)}", up, deadline_s, 0.2)
        except AssertionError:
            raise
        except RuntimeError as exc:  # the node died: no point in waiting out the deadline
            raise AssertionError(str(exc)) from None

    def _wait_registry(self, deadline_s: float) -> None:
        url = f"http://127.0.0.1:{self.registry_host_port}/v2/"

        def answers() -> bool:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bool(response.status == 200)

        wait_until(f"the registry at {url}", answers, deadline_s, 0.2)

    def _form_swarm(self) -> None:
        first, *others = NODES
        manager = self.client(first)
        manager.swarm.init(
            advertise_addr=self.node_ip(first),
            listen_addr="0.0.0.0:2377",
            dispatcher_heartbeat_period=HEARTBEAT_NS,
        )
        manager.swarm.reload()
        token = manager.swarm.attrs["JoinTokens"]["Manager"]
        # One after the other: each new manager joins the raft group through the ones before it.
        for node in others:
            self.client(node).swarm.join(
                remote_addrs=[f"{self.node_ip(first)}:2377"],
                join_token=token,
                advertise_addr=self.node_ip(node),
                listen_addr="0.0.0.0:2377",
            )

    # -- clients and commands -------------------------------------------------------------------

    def client(self, node: str) -> docker.DockerClient:
        """The Docker SDK on ``node``'s engine (tcp://<node ip>:2375), one per node, cached."""
        with self._clients_lock:
            if node not in self._clients:
                self._clients[node] = docker.DockerClient(
                    base_url=f"tcp://{self.node_ip(node)}:{ENGINE_PORT}", timeout=60
                )
            return self._clients[node]

    def manager_client(self) -> docker.DockerClient:
        """The SDK on node-1, the swarm's first manager."""
        return self.client(NODES[0])

    def live_manager_client(self) -> docker.DockerClient:
        """The SDK on the first node whose engine answers (node-1 may be the one stopped)."""
        for node in NODES:
            if self._running(node):
                with contextlib.suppress(Exception):
                    if self.client(node).ping():
                        return self.client(node)
        raise RuntimeError(f"no engine of {', '.join(NODES)} answers")

    def run_on(
        self, node: str, *docker_args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """``docker exec <node> docker <docker_args>``: the node's own CLI on its own engine."""
        return docker_cli("exec", self.container(node), "docker", *docker_args,
                          check=check, timeout=timeout)  # fmt: skip

    def docker_env(
        self, node: str = NODES[0], env: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """An environment in which the host's docker CLI talks to ``node``'s engine."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        return {**base, **(env or {}), "DOCKER_HOST": f"tcp://{self.node_ip(node)}:{ENGINE_PORT}"}

    # -- swarm state ----------------------------------------------------------------------------

    def node_states(self) -> dict[str, tuple[str, str]]:
        """hostname -> (Status.State, ManagerStatus.Reachability) as a live manager reports."""
        states = {}
        for node in self.live_manager_client().nodes.list():
            attrs = node.attrs
            states[attrs["Description"]["Hostname"]] = (
                attrs["Status"]["State"],
                attrs.get("ManagerStatus", {}).get("Reachability", ""),
            )
        return states

    def wait_ready(self, deadline_s: float = 120) -> None:
        """Poll the node list until all three nodes are Ready managers, reachable."""
        want = dict.fromkeys(NODES, ("ready", "reachable"))
        wait_until("all three swarm nodes Ready", lambda: self.node_states() == want, deadline_s)

    def wait_node_state(self, node: str, state: str, deadline_s: float = 60) -> None:
        """Poll until a live manager reports ``node`` in ``state`` ("ready", "down")."""
        wait_until(
            f"the swarm reports {node} {state}",
            lambda: self.node_states().get(node, ("", ""))[0] == state,
            deadline_s,
        )

    def _running(self, node: str) -> bool:
        proc = docker_cli("inspect", "-f", "{{.State.Running}}", self.container(node), check=False)
        return proc.stdout.strip() == "true"

    def stop_node(self, node: str, timeout_s: int = 0) -> None:
        """Stop the node's container: its engine and every task on it die, as a lost machine's.

        The default grace of 0 s kills it outright; give a grace for an orderly engine stop.
        """
        docker_cli("stop", "-t", str(timeout_s), self.container(node), timeout=timeout_s + 60)

    def start_node(self, node: str, deadline_s: float = 120) -> None:
        """Start the node again (same address, same /var/lib/docker); wait until it is Ready."""
        docker_cli("start", self.container(node))
        self._wait_engine(node, deadline_s)
        wait_until(
            f"{node} Ready and reachable again",
            lambda: self.node_states().get(node) == ("ready", "reachable"),
            deadline_s,
        )

    # -- images ---------------------------------------------------------------------------------

    def push(self, *local_tags: str) -> str:
        """Push host images to the registry (once each); the name nodes pull the first by.

        ``celery-stack/app:swarm`` -> ``registry:5000/celery-stack/app:swarm``. Several at once
        share one ``docker save`` and their common layers (see registry_push.py).
        """
        if not local_tags:
            raise ValueError("push: give at least one local_tag")
        targets = {t: Target(t, *split_reference(t)) for t in local_tags}
        with self._push_lock:
            if self.registry_host_port is None:
                raise RuntimeError("push: the cluster is not started")
            todo = [target for t, target in targets.items() if t not in self._pushed]
            if todo:
                started = time.monotonic()
                try:
                    push_images(RegistryClient("127.0.0.1", self.registry_host_port), todo)
                except RuntimeError as exc:
                    # The registry refused an upload (it did for every layer docker save had
                    # stored as a symlink, until their size was taken from the content):
                    # `docker push`, slower (it compresses on one core), is the fallback.
                    print(f"swarm push: fast path failed ({exc}); falling back to docker push")
                    self._docker_push(todo)
                self.timings[f"push {' '.join(t.local_tag for t in todo)}"] = (
                    time.monotonic() - started
                )
                for target in todo:
                    self._pushed[target.local_tag] = (
                        f"{REGISTRY_ALIAS}:{REGISTRY_PORT}/{target.repo}:{target.tag}"
                    )
            return self._pushed[local_tags[0]]

    def _docker_push(self, targets: Sequence[Target]) -> None:
        """Push through the host engine under 127.0.0.1:<port> (an insecure registry by
        default), then drop those host tags."""
        for target in targets:
            host_ref = f"127.0.0.1:{self.registry_host_port}/{target.repo}:{target.tag}"
            docker_cli("tag", target.local_tag, host_ref)
            try:
                docker_cli("push", "-q", host_ref, timeout=900)
            finally:
                docker_cli("rmi", host_ref, check=False)

    def pushed(self, local_tag: str) -> str:
        """The registry name of an image pushed already."""
        try:
            return self._pushed[local_tag]
        except KeyError:
            raise ValueError(f"pushed: local_tag {local_tag!r} was not pushed") from None

    def pull(self, reference: str, nodes: Sequence[str] = NODES) -> None:
        """Pull ``reference`` (a registry:5000 name) onto ``nodes`` at once."""
        started = time.monotonic()
        _parallel(lambda node: self.run_on(node, "pull", "-q", reference, timeout=900), nodes)
        self.timings[f"pull {reference}"] = time.monotonic() - started

    # -- stacks ---------------------------------------------------------------------------------

    def deploy_stack(
        self,
        compose_files: str | Path | Sequence[str | Path],
        name: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """``docker stack deploy`` from the host's CLI against node-1 (DOCKER_HOST=tcp://...).

        ``env`` is added to the environment the compose files are interpolated from. The CLI does
        not resolve digests (``registry`` is a name only the nodes know); nodes pull by tag.
        """
        files = [compose_files] if isinstance(compose_files, str | Path) else list(compose_files)
        if not files:
            raise ValueError("deploy_stack: compose_files is empty")
        args = ["stack", "deploy", "--resolve-image", "never"]
        if _stack_deploy_has_detach():
            args.append("--detach=true")
        for f in files:
            args += ["--compose-file", str(f)]
        return docker_cli(*args, name, env=self.docker_env(env=env), timeout=timeout)

    def remove_stack(self, name: str, deadline_s: float = 120) -> None:
        """``docker stack rm``, then wait until its services, tasks and networks are gone."""
        docker_cli("stack", "rm", name, env=self.docker_env(self._live_node()), check=False)
        wait_until(f"stack {name} removed", lambda: not self.stack_leftovers(name), deadline_s)

    def stack_leftovers(self, name: str) -> list[str]:
        """The stack's services, task containers and networks still present on running nodes."""
        namespace = {"label": f"com.docker.stack.namespace={name}"}
        left = [
            f"service {s.name}" for s in self.live_manager_client().services.list(filters=namespace)
        ]
        for node in NODES:
            if not self._running(node):
                continue
            client = self.client(node)
            for c in client.containers.list(all=True):
                service = c.labels.get("com.docker.swarm.service.name", "")
                if service.startswith(f"{name}_"):
                    left.append(f"container {c.name} on {node}")
            for n in client.networks.list(filters=namespace):
                left.append(f"network {n.name} on {node}")
        return left

    def _live_node(self) -> str:
        return next((n for n in NODES if self._running(n)), NODES[0])

    # -- diagnostics and teardown ---------------------------------------------------------------

    def diagnostics(self) -> str:
        """Nodes, services, tasks and the tail of each node's engine log, for a failed test."""
        parts = []
        live = self._live_node()
        for args in (("node", "ls"), ("service", "ls"), ("network", "ls")):
            proc = self.run_on(live, *args, check=False, timeout=60)
            parts.append(f"--- docker {' '.join(args)} (on {live})\n{proc.stdout}{proc.stderr}")
        for node in NODES:
            proc = self.run_on(node, "ps", "-a", check=False, timeout=60)
            parts.append(f"--- docker ps -a on {node}\n{proc.stdout}{proc.stderr}")
            logs = docker_cli("logs", "--tail", "400", self.container(node), check=False)
            # Without IPVS in this kernel the engine logs the same ipvs errors all the time.
            lines = [
                line
                for line in (logs.stdout + logs.stderr).splitlines()
                if "ipvs" not in line and "net.ipv4.vs." not in line
            ][-40:]
            parts.append(f"--- engine log of {node} (ipvs noise left out)\n" + "\n".join(lines))
        return "\n".join(parts)

    def cgroup_dirs(self) -> list[Path]:
        """The nodes' cgroup-parent directories that exist, under every hierarchy."""
        roots = {CGROUP_ROOT.resolve(), *(p.resolve() for p in CGROUP_ROOT.iterdir() if p.is_dir())}
        return sorted(
            root / self.cgroup_parent(node)
            for root in roots
            for node in NODES
            if (root / self.cgroup_parent(node)).is_dir()
        )

    def leftovers(self) -> list[str]:
        """Everything of this run still present: containers, volumes, networks, cgroups."""
        flt = f"label={RUN_LABEL}={self.run_id}"
        left = []
        for kind, cmd in (
            ("container", ("ps", "-aq", "--filter", flt)),
            ("volume", ("volume", "ls", "-q", "--filter", flt)),
            ("network", ("network", "ls", "-q", "--filter", flt)),
        ):
            left += [f"{kind} {x}" for x in docker_cli(*cmd, check=False).stdout.split()]
        left += [f"cgroup {d}" for d in self.cgroup_dirs()]
        return left

    def teardown(self) -> list[str]:
        """Remove everything this run made, every step tried; returns what is left (if any)."""
        with self._clients_lock:
            for client in self._clients.values():
                with contextlib.suppress(Exception):
                    client.close()
            self._clients.clear()
        flt = f"label={RUN_LABEL}={self.run_id}"
        errors: list[str] = []

        def step(what: str, *cmd: str) -> None:
            # One failing (or slow) step must not skip the others.
            try:
                ids = docker_cli(*cmd, "--filter", flt, check=False, timeout=60).stdout.split()
                if ids:
                    docker_cli(*what.split(), *ids, timeout=300)
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        step("rm -f -v", "ps", "-aq")
        step("volume rm -f", "volume", "ls", "-q")
        step("network rm", "network", "ls", "-q")
        try:
            self._remove_cgroups()
        except Exception as exc:
            errors.append(f"cgroups: {exc}")
        return errors + self.leftovers()

    def _remove_cgroups(self, deadline_s: float = 15) -> None:
        """rmdir the nodes' cgroup trees, deepest first; the kernel frees a cgroup a moment after
        its last process exits, so EBUSY is retried until the deadline."""
        deadline = time.monotonic() + deadline_s
        while True:
            busy = []
            for top in self.cgroup_dirs():
                for path in sorted(
                    (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
                ):
                    try:
                        path.rmdir()
                    except FileNotFoundError:
                        pass
                    except OSError:
                        busy.append(path)
                try:
                    top.rmdir()
                except OSError:
                    busy.append(top)
            if not busy or time.monotonic() >= deadline:
                return
            time.sleep(0.2)


_DETACH: list[bool] = []


def _stack_deploy_has_detach() -> bool:
    """Whether the host CLI's ``stack deploy`` knows ``--detach`` (CLI 26+, which may wait)."""
    if not _DETACH:
        proc = docker_cli("stack", "deploy", "--help", check=False)
        _DETACH.append("--detach" in proc.stdout)
    return _DETACH[0]
