"""A PostgreSQL connection pool per worker process.

Prefork children must not share the parent's sockets, so each process opens its own pool: on
``worker_process_init`` for prefork children, lazily on first use for the solo and thread pools
(which never fire that signal), and closes it on ``worker_process_shutdown``. A pool inherited
across a fork is never used: the owning pid is checked on every use.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions
import psycopg2.pool

log = logging.getLogger(__name__)


class DatabasePool:
    """The process's ThreadedConnectionPool, opened on demand and reopened after a fork."""

    def __init__(
        self, database_url: str, minconn: int, maxconn: int, connect_timeout: int = 5
    ) -> None:
        self.database_url = database_url
        self.minconn = minconn
        self.maxconn = maxconn
        self.connect_timeout = connect_timeout
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        # psycopg2's pool raises PoolError when all connections are out; a thread pool with more
        # threads than connections (worker-io: 32 threads) must wait for one instead.
        self._slots = threading.BoundedSemaphore(maxconn)
        self.wait_timeout = 60.0

    @property
    def is_open(self) -> bool:
        return self._pool is not None and self._pid == os.getpid()

    @property
    def application_name(self) -> str:
        """Shown in pg_stat_activity, so each process's connections can be told apart."""
        return f"celery-service:{os.getpid()}"

    def open(self) -> None:
        """Open this process's pool (idempotent); a pool inherited from a parent is dropped."""
        with self._lock:
            if self.is_open:
                return
            # An inherited pool's sockets belong to the parent: forget them without closing,
            # closing would send a terminate message on the parent's connections.
            self._pool = None
            self._slots = threading.BoundedSemaphore(self.maxconn)
            self._pool = psycopg2.pool.ThreadedConnectionPool(
                self.minconn,
                self.maxconn,
                self.database_url,
                application_name=self.application_name,
                connect_timeout=self.connect_timeout,
            )
            self._pid = os.getpid()
            log.info("database pool opened (pid %s, %s..%s)", self._pid, self.minconn, self.maxconn)

    def close(self) -> None:
        """Close every connection of this process's pool (idempotent)."""
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.closeall()
                log.info("database pool closed (pid %s)", self._pid)
            self._pool = None
            self._pid = None

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """A pooled connection: committed on success, rolled back on error, always returned.

        A connection that broke (server restart, network) is discarded instead of returned, so
        the next caller gets a fresh one. When every connection is in use the caller waits (up to
        ``wait_timeout``, then PoolError, which tasks retry) rather than failing at once.
        """
        if not self.is_open:
            self.open()
        pool, slots = self._pool, self._slots
        assert pool is not None
        if not slots.acquire(timeout=self.wait_timeout):
            raise psycopg2.pool.PoolError(
                f"no free database connection within {self.wait_timeout:.0f} s "
                f"(DB_POOL_MAX={self.maxconn})"
            )
        try:
            conn = pool.getconn()
            broken = False
            try:
                yield conn
                conn.commit()
            except BaseException as exc:
                broken = isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError)
                if not conn.closed:
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        broken = True
                raise
            finally:
                pool.putconn(conn, close=broken or bool(conn.closed))
        finally:
            slots.release()
