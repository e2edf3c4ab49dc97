"""The broker or the database goes away mid-burst and comes back.

Both servers are the test's own (a redis-server with AOF, a PostgreSQL cluster from initdb) on
free loopback ports, killed and restarted on the same port: the shared servers are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from chaos_environment import ChaosEnv
from chaos_figures import Figures
from chaos_processes import PostgresServer, RedisServer
from exactly_once import (
    PostgresEffects,
    RedisBroker,
    absorbed_redeliveries,
    send_burst,
    starts_per_task,
    unique_ids,
    verdict,
    wait_all_done,
)
from support.polling import poll_until
from tcp_cut import TcpCut

from services.migrate import migrate

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

WAIT = "tasks.io_intensive.wait"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        pytest.skip(f"no PostgreSQL binaries to run a server of the test's own: {exc}")
    try:
        server.start()
        migrate(server.url, deadline_s=30)
        yield server
    finally:
        server.cleanup()


def effect_times(database_url: str, task_ids: list[str]) -> dict[str, tuple[str, float]]:
    """task id -> (worker node, commit-side epoch seconds) of its effect."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT task_id, payload->>'worker', extract(epoch FROM created_at)"
                " FROM task_effects WHERE task_id = ANY(%s)",
                (task_ids,),
            )
            return {t: (str(w), float(at)) for t, w, at in cur.fetchall()}
    finally:
        conn.close()


def test_redis_broker_restart_with_aof_mid_burst(
    make_env: Any, own_redis: RedisServer, workers: Any, figures: Figures
) -> None:
    """At the shipped visibility timeout (an hour): what the workers held when the broker died
    (cancelled late-ack tasks, reserved messages) comes back as soon as they reconnect, given
    back by the workers themselves (services.ownership.RestoreOnReconnect), not after an hour."""
    figures.broker = "redis"
    figures.fault = "redis-server (AOF everysec) SIGKILLed and restarted mid-burst of 40"
    figures.recovery_means = "restart to the whole burst done"
    chaos: ChaosEnv = make_env("redis", own_redis.url)
    chaos.env["CELERY_VISIBILITY_TIMEOUT"] = "3600"  # compose/compose.yaml's value
    app = chaos.app()
    queue = chaos.queue("io_intensive")
    ids = unique_ids("aof", 40)
    send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 0.3})
    running = [workers(chaos, ["io_intensive"], concurrency=2) for _ in range(2)]
    poll_until(lambda: len(chaos.effects.counts(ids)) >= 6, "6 done before the restart")

    own_redis.kill()
    poll_until(
        lambda: all("redis" in w.log().lower() and "error" in w.log().lower() for w in running),
        "every worker to notice the broker is gone",
        timeout_s=20,
    )
    done_before = len(chaos.effects.counts(ids))
    own_redis.start()
    restarted = time.time()
    broker = chaos.broker_reader()
    survived = broker.waiting([queue]) + int(broker.unacked() or 0)
    # Every message not yet done was on disk (waiting, or unacked) except at most what the
    # workers had just popped: those live on in the worker that runs them.
    in_worker_memory = 2 * 2
    assert survived >= len(ids) - done_before - in_worker_memory, (survived, done_before)
    figures.notes.append(f"{survived} messages back from the AOF after the restart")

    # The same two workers reconnect and finish everything, the messages they held on the lost
    # connection included: no new worker, no visibility timeout.
    wait_all_done(chaos.effects, ids, timeout=60)
    figures.recovery_s = round(time.time() - restarted, 2)
    gave_up = [w for w in running if not w.alive]
    assert not gave_up, "a worker gave up on the broker:\n" + "\n".join(
        f"exit {w.proc.returncode}, log tail:\n{w.log()[-6000:]}" for w in gave_up
    )
    given_back = sum("on its lost broker connection" in w.log() for w in running)
    figures.notes.append(
        f"visibility timeout 1 h (as shipped); {given_back} of 2 workers gave back what they "
        "held on the lost connection when they reconnected"
    )
    for worker in running:
        assert worker.terminate() == 0

    result = verdict(chaos.effects, broker, ids, [queue])
    figures.count(result.sent, result.done, len(result.lost), len(result.duplicated))
    figures.absorbed_redeliveries = absorbed_redeliveries(chaos.records_url, chaos.key_prefix, ids)
    result.assert_exactly_once()


# Two workers only with Redis down for a while: restarted at once, a message one worker gives
# back as its connection closes can be popped by the other's BRPOP in Redis's last moment and
# lost with that connection before it is recorded (kombu's BRPOP window, docs/nemesis.md: counted
# apart by the campaign). CI once had 1 of 40 not done with two workers restarted at once; that
# window is the likely cause, not a confirmed one: a failure now prints where the missing are.
@pytest.mark.parametrize(("down_s", "count"), [(0.0, 1), (5.0, 2)], ids=["at-once", "down-5s"])
def test_tasks_in_threads_through_a_redis_restart_start_once(
    make_env: Any, own_redis: RedisServer, workers: Any, down_s: float, count: int
) -> None:
    """The nemesis campaign's Redis restarts ran tasks twice on the threads pool while their
    worker lived. A burst of short tasks runs on a threads worker (4 threads, as worker-io) when
    Redis restarts (SIGTERM, at once started again: ``docker restart``): every task starts once,
    and nothing is left unacked or queued."""
    chaos: ChaosEnv = make_env("redis", own_redis.url)
    chaos.env["CELERY_VISIBILITY_TIMEOUT"] = "3600"  # compose/compose.yaml's value
    app = chaos.app()
    queue = chaos.queue("io_intensive")
    ids = unique_ids("thr", 40)
    running = [
        workers(chaos, ["io_intensive"], concurrency=4, pool="threads") for _ in range(count)
    ]
    send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 0.2 + (hash(t) % 13) / 10})
    started = lambda: starts_per_task(chaos.records_url, chaos.key_prefix, ids)  # noqa: E731
    poll_until(lambda: sum(1 for n in started().values() if n) >= 10, "10 started", timeout_s=30)
    own_redis.restart(down_s)
    broker = chaos.broker_reader()
    try:
        wait_all_done(chaos.effects, ids, timeout=90)
    except AssertionError as exc:  # where the missing ones are, and what the workers said
        held = {"unacked": broker.unacked(), "waiting": broker.waiting([queue])}
        raise AssertionError(
            f"{exc}; broker: {held}\n" + "\n".join(w.log()[-6000:] for w in running)
        ) from None
    # Quiet: nothing unacked, nothing queued. A message given back would have run again by then.
    poll_until(lambda: int(broker.unacked() or 0) == 0 and broker.waiting([queue]) == 0,
               "nothing unacked or queued", timeout_s=60)  # fmt: skip
    twice = {t: n for t, n in started().items() if n != 1}
    assert not twice, f"started other than once: {twice}\n" + "\n".join(
        w.log()[-5000:] for w in running
    )
    assert all(w.alive for w in running)


def test_tasks_waiting_for_a_thread_when_redis_goes_again_run_once(
    make_env: Any, own_redis: RedisServer, workers: Any
) -> None:
    """After a first Redis restart the threads pool's busy threads run on (Celery cannot stop a
    thread) while the new connection's deliveries wait for a thread in the pool's queue. When
    Redis goes again, those waiting messages go back to the queue at the reconnect: the pool
    must drop them (services.thread_pool), or they run here later too. The nemesis campaign's
    back-to-back restarts ran such tasks a second time. Every task starts once."""
    chaos: ChaosEnv = make_env("redis", own_redis.url)
    chaos.env["CELERY_VISIBILITY_TIMEOUT"] = "3600"  # compose/compose.yaml's value
    app = chaos.app()
    queue = chaos.queue("io_intensive")
    ids = unique_ids("wt", 10)
    worker = workers(chaos, ["io_intensive"], concurrency=2, pool="threads")
    send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 4.0})
    started = lambda: starts_per_task(chaos.records_url, chaos.key_prefix, ids)  # noqa: E731
    broker = chaos.broker_reader()
    poll_until(lambda: sum(1 for n in started().values() if n) >= 2, "2 started", timeout_s=30)

    own_redis.restart()
    # Reconnected: the two threads still run the first tasks and two more messages, delivered
    # on the new connection, wait for a thread (four unacked).
    poll_until(lambda: int(broker.unacked() or 0) >= 4, "2 running + 2 waiting", timeout_s=30)
    own_redis.restart()

    wait_all_done(chaos.effects, ids, timeout=120)
    poll_until(lambda: int(broker.unacked() or 0) == 0 and broker.waiting([queue]) == 0,
               "nothing unacked or queued", timeout_s=60)  # fmt: skip
    # Whatever ran twice has started its second run by now (the queue is empty): give a waiting
    # duplicate the time of one task to show itself.
    deadline = time.monotonic() + 6
    twice: dict[str, int] = {}
    while time.monotonic() < deadline and not twice:
        twice = {t: n for t, n in started().items() if n != 1}
        time.sleep(0.5)
    assert not twice, f"started other than once: {twice}\n{worker.log()[-4000:]}"
    assert "waiting for a thread on the lost broker connection" in worker.log()
    assert worker.alive


def test_a_broker_connection_cut_while_tasks_run_in_threads_starts_each_once(
    make_env: Any, own_redis: RedisServer, workers: Any
) -> None:
    """The broker connection breaks while Redis answers (behind Docker, a restarted Redis's
    clients notice a second after it is back): kombu's give-back of what the closing channel
    delivered then reaches Redis, and it put back the messages of the tasks still running in the
    worker's threads, and of those whose ack had just failed. The nemesis campaign's Redis
    restarts ran such tasks twice on the threads worker-io. Every task starts once, through two
    cuts mid-burst, and nothing is left unacked or queued."""
    cut = TcpCut(own_redis.port).start()
    try:
        chaos: ChaosEnv = make_env("redis", cut.url())
        chaos.env["CELERY_VISIBILITY_TIMEOUT"] = "3600"  # compose/compose.yaml's value
        app = chaos.app()
        queue = chaos.queue("io_intensive")
        ids = unique_ids("cut", 30)
        worker = workers(chaos, ["io_intensive"], concurrency=4, pool="threads")
        send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 0.5 + (hash(t) % 11) / 5})
        started = lambda: starts_per_task(chaos.records_url, chaos.key_prefix, ids)  # noqa: E731
        for at_least in (6, 16):
            poll_until(lambda n=at_least: sum(1 for v in started().values() if v) >= n,
                       f"{at_least} started", timeout_s=60)  # fmt: skip
            assert cut.reset() > 0
        wait_all_done(chaos.effects, ids, timeout=120)
        broker = RedisBroker(own_redis.url, chaos.key_prefix)
        poll_until(lambda: int(broker.unacked() or 0) == 0 and broker.waiting([queue]) == 0,
                   "nothing unacked or queued", timeout_s=60)  # fmt: skip
        twice = {t: n for t, n in started().items() if n != 1}
        assert not twice, f"started other than once: {twice}\n{worker.log()[-5000:]}"
        assert worker.alive
    finally:
        cut.close()


def test_a_message_taken_as_the_broker_connection_goes_is_given_back_and_runs_once(
    make_env: Any, own_redis: RedisServer, workers: Any
) -> None:
    """kombu's BRPOP window: BRPOP takes a message off its queue and the reply reaches the
    worker, then the connection goes (Redis restarting) before the pipeline that records it as
    unacked: nothing in Redis holds the message any more, and kombu drops it. The relay cuts
    right there, after the reply that carries one chosen task, and refuses connections for 3 s
    (longer than redis-py's retries, as `docker restart redis` is). That task must still run,
    once, without waiting for anything (the untracked message is given back on reconnect)."""
    cut = TcpCut(own_redis.port).start()
    try:
        chaos: ChaosEnv = make_env("redis", cut.url())
        chaos.env["CELERY_VISIBILITY_TIMEOUT"] = "3600"  # compose/compose.yaml's value
        app = chaos.app()
        queue = chaos.queue("io_intensive")
        ids = unique_ids("window", 12)
        victim = ids[5]
        cut.cut_after_reply(victim.encode(), refuse_for_s=3.0)
        worker = workers(chaos, ["io_intensive"], concurrency=2, pool="threads")
        send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 0.2})
        poll_until(cut.marker_seen.is_set, "the reply carrying the chosen task", timeout_s=60)
        try:
            wait_all_done(chaos.effects, ids, timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.log()[-8000:]}") from None
        broker = RedisBroker(own_redis.url, chaos.key_prefix)
        poll_until(lambda: int(broker.unacked() or 0) == 0 and broker.waiting([queue]) == 0,
                   "nothing unacked or queued", timeout_s=60)  # fmt: skip
        started = starts_per_task(chaos.records_url, chaos.key_prefix, ids)
        twice = {t: n for t, n in started.items() if n != 1}
        assert not twice, f"started other than once: {twice}\n{worker.log()[-5000:]}"
        # The cut did land in the window (else this test proved nothing): the worker says so.
        assert "took as its broker connection went" in worker.log(), worker.log()[-5000:]
        assert worker.alive
    finally:
        cut.close()


def test_postgres_outage_mid_burst_retries_then_succeeds(
    make_env: Any, own_postgres: PostgresServer, workers: Any, figures: Figures
) -> None:
    figures.broker = "redis"
    figures.fault = "PostgreSQL stopped (fast) for about 3 s mid-burst of 30"
    figures.recovery_means = "database back to the whole burst settled"
    chaos: ChaosEnv = make_env("redis")
    chaos.env["DATABASE_URL"] = own_postgres.url
    effects = PostgresEffects(own_postgres.url)
    app = chaos.app()
    queue = chaos.queue("io_intensive")
    ids = unique_ids("pg", 30)
    send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 0.3})
    running = [workers(chaos, ["io_intensive"], concurrency=2) for _ in range(2)]
    poll_until(lambda: len(effects.counts(ids)) >= 5, "5 done before the outage")

    own_postgres.stop()
    stopped = time.monotonic()
    poll_until(
        lambda: any("OperationalError" in w.log() for w in running),
        "a task to meet the outage",
        timeout_s=15,
    )
    # The outage itself lasts about 3 s (a duration, not a synchronisation).
    time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))
    own_postgres.start()
    back = time.monotonic()

    broker = chaos.broker_reader()
    # Settled: nothing waiting or held, whatever became of each task.
    poll_until(
        lambda: broker.waiting([queue]) == 0 and broker.unacked() == 0,
        "the broker to hold nothing",
        timeout_s=90,
        every_s=0.5,
    )
    # Tasks that met the outage retry with backoff (RecordingTask.autoretry_for) and then succeed.
    wait_all_done(effects, ids, timeout=60)
    figures.recovery_s = round(time.monotonic() - back, 2)
    for worker in running:
        assert worker.terminate() == 0

    result = verdict(effects, broker, ids, [queue])
    figures.count(result.sent, result.done, len(result.lost), len(result.duplicated))
    figures.absorbed_redeliveries = absorbed_redeliveries(chaos.records_url, chaos.key_prefix, ids)
    result.assert_exactly_once()


def test_rabbitmq_restart_mid_burst() -> None:
    pytest.skip(
        "not run: a RabbitMQ node of the test's own (its own node name, ports and Mnesia dir) "
        "takes several seconds per start and cannot share the machine's node safely; the "
        "queues are durable and the worker reconnects as on Redis (broker_connection_retry)"
    )
