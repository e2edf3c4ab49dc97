"""The warm pool on the local backend: real Celery workers on a real Redis, pool in Redis.

What it must guarantee (scaler.backends.warm_pool): a warm worker consumes nothing and never
runs a task while warm; a scale-up promotes it (its node then runs the work, no cold start) and
the pool is refilled; a scale-down returns drained workers to the pool before stopping any; a
restarted scaler adopts the pool from Redis (no queues given back to its members) and corrects
a member whose consumer came back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from scaler_support import consumed
from support.polling import poll_until

from scaler.backends.base import ServiceSpec
from scaler.backends.local import LocalBackend
from scaler.backends.warm_pool import RedisPoolStore
from scaler.loop import PolicySource, Scaler
from scaler.policy import parse_policy
from scaler.signals.collector import Collector
from scaler.signals.redis_queues import RedisQueueReader

pytestmark = pytest.mark.slow

SERVICE = "io"
QUEUE = "io_intensive"
SPEC = ServiceSpec(SERVICE, (QUEUE,))


@pytest.fixture
def store(redis_url: str, env: dict[str, str]) -> Iterator[RedisPoolStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisPoolStore(client, prefix=env["CELERY_KEY_PREFIX"])
    yield store
    client.delete(store.key(SERVICE))
    client.close()


def make_backend(app: Any, env: dict[str, str], workdir: Path, store: RedisPoolStore) -> Any:
    backend = LocalBackend(app=app, workdir=workdir, env=env, grace_s=20.0, pool_store=store)
    backend.manage([SPEC])
    return backend


@pytest.fixture
def backend(
    app: Any, env: dict[str, str], tmp_path: Path, store: RedisPoolStore
) -> Iterator[LocalBackend]:
    backend = make_backend(app, env, tmp_path / "workers", store)
    try:
        yield backend
    finally:
        backend.stop_all(timeout_s=10.0)


def ran_on(task: Any) -> str:
    """The Celery node that ran ``task`` (every task's result names its worker)."""
    return str(task.get(timeout=30)["worker"])


def wait(app: Any, seconds: float, queue: str = QUEUE) -> Any:
    return app.send_task("tasks.io_intensive.wait", kwargs={"duration": seconds}, queue=queue)


def test_a_decision_promotes_the_warm_worker_refills_the_pool_and_returns_drained_ones(
    backend: LocalBackend, app: Any, env: dict[str, str]
) -> None:
    # The loop keeps one serving and one warm (policy warm: 1), observed and reported as such.
    policy = parse_policy(
        # The host guard never binds (a loaded CI machine must not release the pool mid-test:
        # that rule is the decision core's, tested there).
        {"interval_s": 1.0, "host": {"cpu_percent": 100, "memory_percent": 100},
         "services": {SERVICE: {"queues": [QUEUE], "min_replicas": 1, "max_replicas": 3,
                                "warm": 1}}},
        env={},
    )  # fmt: skip
    reader = RedisQueueReader.from_url(
        env["CELERY_BROKER_URL"], key_prefix=env["CELERY_KEY_PREFIX"]
    )
    scaler = Scaler(PolicySource(policy), backend, Collector(queues=reader))
    scaler.cycle()
    assert (backend.replicas(SERVICE), backend.warm(SERVICE)) == (1, 1)
    assert backend.wait_for_warm(60.0)
    report = scaler.cycle()
    assert report.observations.services[SERVICE].warm == 1
    assert scaler.last_snapshot is not None and scaler.last_snapshot.services[SERVICE].warm == 1
    (warm_node,) = backend._pool.members(SERVICE)
    assert consumed(app, warm_node) == [], "a warm worker consumes nothing"

    # While warm it runs nothing: the serving worker runs every task.
    quick = [wait(app, 0.05) for _ in range(4)]
    nodes = {ran_on(task) for task in quick}
    assert warm_node not in nodes and len(nodes) == 1, nodes

    # A scale-up (as the loop's decision calls it) takes the warm worker first: no cold start.
    busy = wait(app, 8.0)  # long enough to keep the serving worker busy on a loaded machine
    poll_until(lambda: backend._busy_counts(sorted(n for n in names(backend) if n != warm_node)),
               "the serving worker to take the long task")  # fmt: skip
    up = backend.scale(SERVICE, 2, warm=1)
    assert up.promoted == (warm_node,) and up.started == (warm_node,), up
    assert len(up.warm_started) == 1 and up.warm_started[0] != warm_node
    assert consumed(app, warm_node) == [QUEUE]
    assert (backend.replicas(SERVICE), backend.warm(SERVICE)) == (2, 1)
    # It serves the queue: while the other worker is busy, quick tasks go to it. Polled, task
    # by task: on a loaded machine the long task may be over by now (CI saw the scale call
    # itself outlast 8 s), and then either worker may take the next one.
    poll_until(lambda: ran_on(wait(app, 0.05)) == warm_node,
               "the promoted worker to run a task from the queue", timeout_s=60)  # fmt: skip
    busy.get(timeout=30)
    assert backend.wait_for_warm(60.0)
    (refill,) = backend._pool.members(SERVICE)
    assert consumed(app, refill) == []

    # Scale-down with a pool of 2 wanted: one drained worker goes back to the pool, one stops.
    down = backend.scale(SERVICE, 0, warm=2)
    assert (len(down.to_pool), len(down.draining)) == (1, 1), down
    assert backend.wait_for_drains(40.0)
    kinds = sorted(e.kind for e in backend.reconcile())
    assert kinds == ["drained", "returned-to-pool"], kinds
    assert (backend.replicas(SERVICE), backend.warm(SERVICE)) == (0, 2)
    assert consumed(app, down.to_pool[0]) == []
    assert backend._pool.members(SERVICE) == {refill, down.to_pool[0]}


def names(backend: LocalBackend) -> set[str]:
    return {w.name for w in backend.workers(SERVICE)}


def test_a_restarted_scaler_adopts_the_pool_and_corrects_a_member_consuming_again(
    backend: LocalBackend, app: Any, env: dict[str, str], store: RedisPoolStore
) -> None:
    backend.scale(SERVICE, 1, warm=1)
    assert backend.wait_for_warm(60.0)
    (member,) = store.members(SERVICE)
    (serving,) = names(backend) - {member}
    poll_until(lambda: consumed(app, serving) == [QUEUE], "the serving worker consuming")

    # A new backend (a restarted scaler, or the standby taking over) on the same pool.
    fresh = make_backend(app, env, backend.workdir, store)
    assert (fresh.replicas(SERVICE), fresh.warm(SERVICE)) == (1, 1)
    events = fresh.reconcile()
    assert not [e for e in events if e.kind.startswith("consumers-restore")], events
    assert fresh.wait_for_warm(30.0)
    assert consumed(app, member) == [], "the stranded-worker rule skips pool members"

    # Its consumer comes back (an operator, a stray add_consumer): the pool corrects it.
    app.control.add_consumer(QUEUE, destination=[member], reply=True, timeout=5.0)
    poll_until(lambda: consumed(app, member) == [QUEUE], "the stray consumer in place")
    events = fresh.reconcile()
    assert [e.kind for e in events] == ["warm-consumer-corrected"], events
    # The cancel is a broadcast the member carries out on its own: polled, not read once (CI
    # read the queue still listed right after the correction, on a loaded machine).
    poll_until(lambda: consumed(app, member) == [], "the member consuming nothing again", 15)
    assert store.members(SERVICE) == {member}


def test_a_scale_up_to_max_takes_a_booting_warm_worker_as_serving_never_one_over_max(
    backend: LocalBackend, app: Any, store: RedisPoolStore
) -> None:
    """max 2, serving 1 + warm 1 still booting, and a decision for 2 serving (the pool's share
    of max is gone: warm 0). Starting a cold worker and stopping the booting member would run
    three workers for the seconds the stop takes; the booting member is taken as serving
    instead (committed), gets its queue once it answers, and runs work."""
    backend.scale(SERVICE, 1, warm=1)
    (member,) = store.members(SERVICE)
    assert backend._pool.node(member) is None, "the member answered already: not booting"
    up = backend.scale(SERVICE, 2, warm=0)
    assert up.committed == (member,) and up.started == (member,), up
    assert up.warm_started == () and up.warm_stopped == (), up
    assert (backend.replicas(SERVICE), backend.warm(SERVICE)) == (2, 0)
    assert len(names(backend)) == 2, "a third worker beside the two allowed"
    assert store.members(SERVICE) == set()
    poll_until(lambda: consumed(app, member) == [QUEUE], "the committed worker consuming",
               timeout_s=60)  # fmt: skip
    assert len(names(backend)) == 2
    events = [e.kind for e in backend.reconcile()]
    assert "warm-committed" in events and "consumers-restored" not in events, events
