"""The PostgreSQL pool: one per worker process, opened at process start, closed at its end."""

from __future__ import annotations

import os
from typing import Any

import psycopg2
import psycopg2.pool
import pytest

from services.db import DatabasePool


def app_connections(db: Any) -> dict[int, int]:
    """pid -> number of open connections, for this service's processes."""
    with db.cursor() as cur:
        cur.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE application_name LIKE 'celery-service:%%' AND datname = current_database()"
            " GROUP BY 1"
        )
        return {int(name.split(":")[1]): count for name, count in cur.fetchall()}


def test_context_manager_commits_rolls_back_and_returns(service_database: str, db: Any) -> None:
    pool = DatabasePool(service_database, 1, 2)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO sessions (session_id, expires_at) VALUES ('c1', now())")
        with pytest.raises(ZeroDivisionError), pool.connection() as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO sessions (session_id, expires_at) VALUES ('r1', now())")
            raise ZeroDivisionError
        with db.cursor() as cur:
            cur.execute("SELECT session_id FROM sessions WHERE session_id IN ('c1', 'r1')")
            assert cur.fetchall() == [("c1",)]
        # Both connections went back: two more can be taken from a pool of two.
        with pool.connection(), pool.connection():
            pass
    finally:
        pool.close()
        with db.cursor() as cur:
            cur.execute("DELETE FROM sessions WHERE session_id = 'c1'")


def test_more_threads_than_connections_wait_instead_of_failing(service_database: str) -> None:
    import threading

    pool = DatabasePool(service_database, 1, 2)
    errors: list[BaseException] = []
    done: list[int] = []
    inside = threading.Semaphore(0)
    release = threading.Event()

    def work(i: int) -> None:
        try:
            with pool.connection() as conn, conn.cursor() as cur:
                inside.release()
                release.wait(10)
                cur.execute("SELECT %s", (i,))
                done.append(cur.fetchone()[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        # Two threads hold both connections; the other six wait rather than raise PoolError.
        assert inside.acquire(timeout=10) and inside.acquire(timeout=10)
        assert not inside.acquire(timeout=0.3)
        release.set()
        for t in threads:
            t.join(20)
        assert errors == []
        assert sorted(done) == list(range(8))
    finally:
        release.set()
        pool.close()


def test_a_pool_that_stays_full_raises_pool_error_naming_the_setting(service_database: str) -> None:
    pool = DatabasePool(service_database, 1, 1)
    pool.wait_timeout = 0.2
    try:
        with (
            pool.connection(),
            pytest.raises(psycopg2.pool.PoolError, match="DB_POOL_MAX=1"),
            pool.connection(),
        ):
            pass
    finally:
        pool.close()


def test_broken_connection_is_discarded(service_database: str, db: Any) -> None:
    pool = DatabasePool(service_database, 1, 1)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            first_pid = cur.fetchone()[0]
        with db.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
        with pytest.raises(psycopg2.OperationalError), pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] != first_pid
    finally:
        pool.close()


def test_pool_is_reopened_in_a_forked_child(service_database: str, db: Any) -> None:
    pool = DatabasePool(service_database, 1, 1)
    pool.open()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - child process
            ok = not pool.is_open
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            pool.close()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connection still works: the child did not close it.
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        pool.close()


@pytest.mark.slow
def test_each_pool_child_has_its_own_pool_closed_at_exit(
    redis_env: Any, start_worker: Any, db: Any, poll: Any
) -> None:
    app = redis_env.app()
    worker = start_worker(
        redis_env,
        ["default"],
        concurrency=2,
        extra_env={"DB_POOL_MIN": "1", "DB_POOL_MAX": "2", "CELERY_MAX_TASKS_PER_CHILD": "2"},
    )
    children = set(worker.children())
    assert len(children) == 2
    poll(lambda: set(app_connections(db)) == children, "one pool per child process")
    assert worker.proc.pid not in app_connections(db)  # the main process runs no tasks

    # Each child is replaced after two tasks: its pool closes, the new child's opens.
    for result in [app.send_task("tasks.default.record", kwargs={}) for _ in range(8)]:
        result.get(timeout=30)
    poll(lambda: not children & set(worker.children()), "recycled children")
    poll(
        lambda: set(app_connections(db)) == set(worker.children()),
        "connections only from the live children",
    )
    assert all(count <= 2 for count in app_connections(db).values())

    assert worker.terminate() == 0
    poll(lambda: not app_connections(db), "every pool closed at shutdown")
