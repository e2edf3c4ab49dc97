"""The Swarm backend on a real three-node swarm: counts across nodes, safe scale-down, lost nodes.

Real parts throughout: three Docker-in-Docker managers, the application image pulled from the
test registry, Celery workers in Swarm tasks, Redis and PostgreSQL. Shipped settings: the
visibility timeout (one hour), the stop grace period (150 s) and the task time limit as in
compose.yaml; so a task a lost node held comes back because the backend gives it back, not
because a shortened timeout ran out.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import docker
import pytest
import redis
import yaml
from backing import Backing, create_worker_service, start_backing, wait_answering
from cluster import ENGINE_PORT, NODES, SwarmCluster
from stack_gate import stack_gate

from scaler.backends.base import BackendEvent, ScaleResult, ServiceSpec
from scaler.backends.swarm import ENDED, SwarmBackend, SwarmTask
from scaler.loop import PolicySource, Scaler
from scaler.policy import parse_policy
from scaler.restore import UnackedRestorer
from scaler.signals.collector import Collector, queue_reader_for_app
from services.records import STARTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from compose_project import ROOT, wait_until
from exactly_once import (
    PostgresEffects,
    RedisBroker,
    runs_per_task,
    send_burst,
    unique_ids,
    verdict,
)

pytestmark = [pytest.mark.swarm, pytest.mark.docker]

IO_QUEUE = "io_intensive"
WAIT_TASK = "tasks.io_intensive.wait"
MANAGER = NODES[0]


@pytest.fixture(scope="module")
def backing(swarm_cluster: SwarmCluster) -> Iterator[Backing]:
    env = start_backing(swarm_cluster)
    try:
        yield env
    finally:
        env.close()


class Harness:
    """One worker service of a stack of its own, and the backend driving it from the host through
    an engine gate of the stack's scope in front of the manager (stack_gate.py)."""

    def __init__(self, cluster: SwarmCluster, backing: Backing, images: Any, replicas: int):
        self.cluster = cluster
        self.stack = f"sw{uuid.uuid4().hex[:6]}"
        self.app = backing.app()
        self.backing = backing
        self.manager = cluster.manager_client()
        self.service = create_worker_service(
            self.manager, stack=self.stack, name="worker-io", image=images.app,
            env=backing.worker_env(IO_QUEUE, "threads", 4), replicas=replicas,
        )  # fmt: skip
        self.gate = stack_gate(cluster, self.stack, MANAGER).__enter__()
        self.restorer = UnackedRestorer.for_app(self.app)
        self.backend = SwarmBackend(
            self.stack, self.app, restorer=self.restorer, poll_s=0.2,
            client_factory=self.gate.clients(),
        )  # fmt: skip
        self.backend.manage([ServiceSpec("worker-io", (IO_QUEUE,))])
        self.events: list[BackendEvent] = []
        self.effects = PostgresEffects(backing.database_url)

    def tasks(self) -> list[SwarmTask]:
        return [SwarmTask.from_api(t) for t in self.manager.api.tasks(
            filters={"service": self.service.id})]  # fmt: skip

    def reconcile(self) -> None:
        self.events += self.backend.reconcile()

    def wait_serving(self, count: int, deadline_s: float = 180) -> list[str]:
        """Poll until ``count`` live tasks and as many workers answer; their node names."""
        wait_until(f"{count} live tasks", lambda: self.backend.replicas("worker-io") == count,
                   deadline_s=deadline_s)  # fmt: skip
        nodes = wait_answering(self.app, count, deadline_s)
        self.reconcile()  # names the workers
        return nodes

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def close(self) -> None:
        self.backend.close()
        try:
            self.service.remove()
            wait_until("the service's containers gone", lambda: not self.tasks_running(),
                       deadline_s=60)  # fmt: skip
        finally:
            self.gate.__exit__(None, None, None)
            self.manager.close()
            if self.restorer is not None:
                self.restorer.close()

    def tasks_running(self) -> bool:
        try:
            return any(t.state == "running" for t in self.tasks())
        except docker.errors.NotFound:
            return False


@pytest.fixture
def harness(swarm_cluster: SwarmCluster, swarm_images: Any, backing: Backing) -> Iterator[Harness]:
    h = Harness(swarm_cluster, backing, swarm_images, replicas=1)
    try:
        yield h
    finally:
        h.close()


def test_scale_up_spreads_over_nodes_and_scale_down_stops_only_idle_drained_workers(
    harness: Harness,
) -> None:
    h = harness
    h.wait_serving(1)
    result = h.backend.scale("worker-io", 3)
    assert (result.before, result.after) == (1, 3)
    h.wait_serving(3)
    live = [t for t in h.tasks() if t.live]
    assert len({t.node_id for t in live}) >= 2, f"three replicas on one node: {live}"

    # Two long tasks keep at most two workers busy; scale to one while they run.
    ids = unique_ids("swarm-down", 2)
    send_burst(h.app, WAIT_TASK, ids, lambda t: {"duration": 20.0, "key": t})

    def busy_nodes() -> set[str] | None:
        active = h.app.control.inspect(timeout=1.0).active() or {}
        holding = {n for n, tasks in active.items() if tasks}
        running = {a["id"] for tasks in active.values() for a in tasks}
        return holding if set(ids) <= running else None

    busy: set[str] = wait_until("both long tasks running", busy_nodes, deadline_s=60)
    busy_hosts = {n.split("@", 1)[1] for n in busy}
    result = h.backend.scale("worker-io", 1)
    drained = set(result.draining)
    assert drained and not drained & busy, f"drained {drained}, busy {busy}"
    assert result.after == 3 - len(drained)

    def settled() -> bool:
        h.reconcile()
        return not h.backend.health().extra.get("draining")

    wait_until("the drains finished", settled, deadline_s=120)
    assert "drained" in h.kinds(), h.events
    assert "swarm-removed-another" not in h.kinds(), h.events
    tasks = h.tasks()
    runnable = [t for t in tasks if t.runnable]
    # The busy workers were never told to stop: same containers, still running their tasks.
    assert {t.host for t in runnable} == busy_hosts
    assert all(t.state == "running" for t in runnable)
    assert h.manager.api.inspect_service(h.service.id)["Spec"]["Mode"]["Replicated"][
        "Replicas"
    ] == len(busy_hosts)
    # Each drained worker exited 0 ("complete": Swarm left its slot empty, restarted nothing)
    # before the count dropped; Swarm then deleted only that empty slot.
    done = [e.detail for e in h.events if e.kind == "drained"]
    assert len(done) == len(drained) and all("exited 0" in d for d in done), h.events
    assert all("no other task stopped" in d for d in done), done
    assert "drain-exit-failed" not in h.kinds(), h.events
    wait_until("both long tasks done", lambda: len(h.effects.counts(ids)) == 2, deadline_s=60)
    broker = RedisBroker(h.backing.broker_url, "")
    try:
        verdict(h.effects, broker, ids, [IO_QUEUE]).assert_exactly_once()
    finally:
        broker.close()
    assert runs_per_task(h.backing.records_url, "", ids) == dict.fromkeys(ids, 1)


def test_a_node_lost_mid_burst_is_rescheduled_and_its_tasks_come_back_at_once(
    harness: Harness,
) -> None:
    h = harness
    h.backend.scale("worker-io", 3)
    h.wait_serving(3)
    node_ids = {n.attrs["Description"]["Hostname"]: n.id for n in h.manager.nodes.list()}

    def placed(node: str) -> list[SwarmTask]:
        return [t for t in h.tasks() if t.live and t.node_id == node_ids[node]]

    # Not the manager the backend talks to; one that runs a worker (Swarm spreads three).
    victim_node = next((n for n in NODES[1:] if placed(n)), None)
    assert victim_node is not None, f"no worker on {NODES[1:]}: {h.tasks()}"
    on_victim = placed(victim_node)
    ids = unique_ids("swarm-nodelost", 36)
    send_burst(h.app, WAIT_TASK, ids, lambda t: {"duration": 3.0, "key": t})
    victim_hosts = {t.host for t in on_victim}

    def victim_holds() -> bool:
        active = h.app.control.inspect(timeout=1.0).active() or {}
        return any(n.split("@", 1)[1] in victim_hosts and tasks for n, tasks in active.items())

    wait_until(f"a worker on {victim_node} running tasks", victim_holds, deadline_s=60)
    t_lost = time.monotonic()
    h.cluster.stop_node(victim_node)  # killed: its engine and workers die at once
    try:
        h.cluster.wait_node_state(victim_node, "down", deadline_s=90)

        def recovered() -> bool:
            h.reconcile()
            return h.backend.replicas("worker-io") == 3 and len(h.effects.counts(ids)) == len(ids)

        wait_until("3 replicas again and every task done", recovered, deadline_s=240, every_s=1)
        elapsed = time.monotonic() - t_lost
        assert "task-ended" in h.kinds(), h.events
        assert "restored" in h.kinds(), h.events  # given back, not left for the 1 h timeout
        live = [t for t in h.tasks() if t.live]
        assert node_ids[victim_node] not in {t.node_id for t in live}
        broker = RedisBroker(h.backing.broker_url, "")
        try:
            wait_until("nothing unacked", lambda: broker.unacked() == 0, deadline_s=60)
            verdict(h.effects, broker, ids, [IO_QUEUE]).assert_exactly_once()
        finally:
            broker.close()
        runs = runs_per_task(h.backing.records_url, "", ids)
        print(f"node lost: all {len(ids)} done {elapsed:.1f} s after the kill; "
              f"runs {sum(runs.values())} for {len(ids)} tasks")  # fmt: skip
    finally:
        h.cluster.start_node(victim_node)


def test_the_shipped_policy_drives_the_loop_on_swarm_through_a_burst_and_back(
    harness: Harness, tmp_path: Path
) -> None:
    """compose/scaler-policy.yaml, the file `make up` mounts for the Compose backend, loaded
    as it is into the real loop over the Swarm backend: worker-io's rules (the harness runs
    only worker-io), windows and steps as shipped; the host guard's limits raised to 100 %,
    since every node of this cluster is the same loaded CI machine."""
    h = harness
    raw = yaml.safe_load((ROOT / "compose/scaler-policy.yaml").read_text())
    raw["services"] = {"worker-io": raw["services"]["worker-io"]}
    raw["host"] = {"cpu_percent": 100, "memory_percent": 100}
    policy = parse_policy(raw, env={})
    window = policy.services["worker-io"].scale_down.stabilization_s
    scaler = Scaler(PolicySource(policy), h.backend, Collector(queue_reader_for_app(h.app)),
                    state_file=tmp_path / "state.json")  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    h.wait_serving(1)
    thread.start()
    try:
        ids = unique_ids("swarm-loop", 160)
        send_burst(h.app, WAIT_TASK, ids, lambda t: {"duration": 3.0, "key": t})
        # 160 waiting over 32 per replica (worker-io's target as shipped): 5 replicas.
        peak = wait_until("worker-io scaled up to >= 4", lambda: (
            n := h.backend.replicas("worker-io")) >= 4 and n, deadline_s=90)  # fmt: skip
        running: list[SwarmTask] = wait_until(f"{peak} replicas running", lambda: (
            r := [t for t in h.tasks() if t.live and t.state == "running"]) and len(r) >= peak
            and r, deadline_s=120)  # fmt: skip
        assert len({t.node_id for t in running}) >= 2, f"{len(running)} replicas on one node"
        wait_until("the burst done", lambda: len(h.effects.counts(ids)) == len(ids),
                   deadline_s=240, every_s=1)  # fmt: skip
        t_done = time.monotonic()
        wait_until("worker-io back at 1 after the window",
                   lambda: h.backend.replicas("worker-io") == 1
                   and not h.backend.health().extra.get("draining"),
                   deadline_s=window + 120, every_s=1)  # fmt: skip
        back_after = time.monotonic() - t_done
        assert back_after >= window * 0.5, f"back at 1 only {back_after:.0f} s after the burst"
    finally:
        stop.set()
        thread.join(30)
    events = "\n".join(scaler.events)
    # Every replica removed was one the backend drained; Swarm stopped none on its own (no
    # rolling update from a count change, no scale-down choice of its own), none ended early.
    assert events.count(" drained: ") >= 3, events
    assert "swarm-removed-another" not in events and "task-ended" not in events, events
    broker = RedisBroker(h.backing.broker_url, "")
    try:
        verdict(h.effects, broker, ids, [IO_QUEUE]).assert_exactly_once()
    finally:
        broker.close()
    assert runs_per_task(h.backing.records_url, "", ids) == dict.fromkeys(ids, 1)
    # Every replica reported its CPU and memory, and so did the nodes they ran on.
    assert h.backend.resources_reader.nodes(), "no node reported its machine's figures"


class TaskWatch:
    """Polls a service's tasks (a client of its own) until stopped, and keeps what Swarm did
    to any task off ``skip_node``: told a live one to stop (desired no longer running while the
    task had not ended), or dropped a live one between two polls."""

    def __init__(self, url: str, service_id: str, skip_node: str, every_s: float = 0.2):
        self.client = docker.DockerClient(base_url=url, timeout=30)
        self.service_id, self.skip_node, self.every_s = service_id, skip_node, every_s
        self.stopped: dict[str, str] = {}  # task id -> what was seen
        self.last: dict[str, SwarmTask] = {}
        self.polls = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="task-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                rows = self.client.api.tasks(filters={"service": self.service_id})
            except Exception:
                continue  # a slow manager: the next poll
            now = {t.id: t for t in map(SwarmTask.from_api, rows)}
            self.polls += 1
            for tid, task in now.items():
                if task.node_id == self.skip_node or task.state in ENDED:
                    continue
                if task.desired not in ("ready", "running"):
                    seen = f"slot {task.slot} desired {task.desired} in state {task.state}"
                    self.stopped.setdefault(tid, f"{seen} on {task.node_id[:12]!r}")
            for tid, task in self.last.items():
                if tid not in now and task.live and task.node_id != self.skip_node:
                    self.stopped.setdefault(tid, f"slot {task.slot} gone while {task.state}")
            self.last = now

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.client.close()


def test_scale_downs_while_a_node_is_lost_mid_burst_stop_only_drained_workers(
    harness: Harness,
) -> None:
    """issue 18 (defect 6): Swarm picks the slots a lower count removes by node balance before
    task state, so with a node lost (its tasks replaced, pending or starting elsewhere) a count
    lowered after a drain could land on another worker. A node is killed mid-burst and the
    service scaled down one worker at a time, round after round, while Swarm replaces what the
    node ran, then the node is brought back: no task but the drained ones is ever told to stop,
    every task of the burst starts once on the surviving workers, and nothing starts again on
    the returned node's old workers."""
    h = harness
    seed = int(time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    print(f"seed {seed}")
    start = 6
    h.backend.scale("worker-io", start)
    h.wait_serving(start)
    node_ids = {n.attrs["Description"]["Hostname"]: n.id for n in h.manager.nodes.list()}
    placed = {n: [t for t in h.tasks() if t.live and t.node_id == node_ids[n]] for n in NODES}
    victim = rng.choice([n for n in NODES[1:] if placed[n]])  # never the backend's manager
    victim_hosts = {t.host for t in placed[victim]}
    # Long tasks keep some workers busy through the rounds; the short ones make the burst.
    long_ids, short_ids = unique_ids("swarm-lost-long", 3), unique_ids("swarm-lost-short", 36)
    send_burst(h.app, WAIT_TASK, long_ids, lambda t: {"duration": 30.0, "key": t})
    send_burst(h.app, WAIT_TASK, short_ids, lambda t: {"duration": 2.0, "key": t})
    ids = long_ids + short_ids

    def victim_holds() -> bool:
        active = h.app.control.inspect(timeout=1.0).active() or {}
        return any(n.split("@", 1)[1] in victim_hosts and tasks for n, tasks in active.items())

    wait_until(f"a worker on {victim} running tasks", victim_holds, deadline_s=60)
    url = f"tcp://{h.cluster.node_ip(MANAGER)}:{ENGINE_PORT}"
    watch = TaskWatch(url, h.service.id, str(node_ids[victim]))
    t_lost, lost_at = time.monotonic(), time.time()
    h.cluster.stop_node(victim)  # killed: its workers die holding tasks
    rounds: list[str] = []
    back = False
    try:
        for i in range(5):  # one worker fewer each round while Swarm replaces the lost ones
            target = max(1, h.backend.replicas("worker-io") - 1)

            def a_drain_begins(target: int = target) -> ScaleResult | None:
                # With every worker busy the scale-down is held (nothing idle to drain): the
                # round asks again each second until one drains, as the loop's next cycle would.
                h.reconcile()
                result = h.backend.scale("worker-io", target)
                return result if result.draining or result.before <= target else None

            result = wait_until(f"round {i}: an idle worker to drain", a_drain_begins,
                                deadline_s=90, every_s=1)  # fmt: skip

            def drained() -> bool:
                h.reconcile()
                return not h.backend.health().extra.get("draining")

            wait_until(f"round {i}'s drains finished", drained, deadline_s=60)
            rounds.append(f"{result.before}->{target} at {time.monotonic() - t_lost:.0f} s: "
                          f"drained {len(result.draining)}")  # fmt: skip

        # The node comes back mid-burst (its engine and /var/lib/docker as they were): what ran
        # there died with it, and nothing of it may start again there.
        h.cluster.start_node(victim)
        back = True

        def settled() -> bool:
            h.reconcile()
            return len(h.effects.counts(ids)) == len(ids) and h.backend.replicas("worker-io") > 0

        wait_until("every task of the burst done", settled, deadline_s=120, every_s=1)
    finally:
        watch.close()
        if not back:
            h.cluster.start_node(victim)
    print(f"node lost: {len(rounds)} rounds ({'; '.join(rounds)}); {watch.polls} task polls")
    drains = [e.detail for e in h.events if e.kind in ("drained", "released")]
    print("\n".join(drains))
    assert not watch.stopped, f"Swarm stopped tasks the scaler did not drain: {watch.stopped}"
    assert "swarm-removed-another" not in h.kinds(), h.events
    assert sum(1 for e in h.events if e.kind == "drained") >= 3, h.events
    assert all("exited 0" in e.detail for e in h.events if e.kind == "drained"), drains
    broker = RedisBroker(h.backing.broker_url, "")
    try:
        wait_until("nothing unacked", lambda: broker.unacked() == 0, deadline_s=60)
        verdict(h.effects, broker, ids, [IO_QUEUE]).assert_exactly_once()
    finally:
        broker.close()
    # Each task started once on the workers that survived: none was stopped under a task; and
    # no worker of the lost node started anything after it was lost (none came back to life).
    starts = starts_by_task(h.backing.records_url, ids)
    again = {
        t: nodes
        for t, nodes in starts.items()
        if len([n for n, _ in nodes if n.split("@", 1)[-1] not in victim_hosts]) != 1
    }
    assert not again, f"started other than once off {victim}: {again}"
    revived = {
        t: [n for n, at in nodes if n.split("@", 1)[-1] in victim_hosts and at > lost_at]
        for t, nodes in starts.items()
    }
    assert not any(revived.values()), f"started on {victim}'s workers after its loss: {revived}"


def starts_by_task(records_url: str, task_ids: list[str]) -> dict[str, list[tuple[str, float]]]:
    """The Celery nodes each task started on, and when (``task_starts``, services.records)."""
    client = redis.Redis.from_url(records_url)
    try:
        raw = cast(list[bytes], client.lrange(STARTS, 0, -1))
    finally:
        client.close()
    starts: dict[str, list[tuple[str, float]]] = {t: [] for t in task_ids}
    for item in raw:
        record = json.loads(item)
        if record.get("task_id") in starts:
            at = float(record.get("timestamp") or 0.0)
            starts[record["task_id"]].append((str(record.get("node")), at))
    return starts
