"""The gate's server settings (uvicorn, h11), the same for ``python -m scaler.gate`` and the
gate served in a thread (``background``, the tests).

uvicorn's h11 has no header-read timeout; ``scaler.http_limits`` adds one (as it does to the
scaler's own API): a request's head and body must arrive within ``READ_TIMEOUT_S`` of its first
byte (408 and closed past it), at most ``LIMIT_CONCURRENCY`` connections are open and
``LIMIT_PER_CLIENT`` from one address; one past a cap displaces the oldest connection still
sending a request (an idle one too), and only when every one is mid-request is it answered 503.
An idle connection (the scaler's client keeps them for its next cycle) is closed after
``KEEP_ALIVE_S``.
"""

from __future__ import annotations

import logging

import uvicorn

from scaler.gate.app import Gate
from scaler.http_limits import ConnectionGuard, guarded_protocol

READ_TIMEOUT_S = 10.0
# The scaler holds one stats stream per worker container, one event stream, and a few calls.
LIMIT_CONCURRENCY = 512
LIMIT_PER_CLIENT = 256
KEEP_ALIVE_S = 600  # the scaler's client keeps idle connections for its next cycle


def uvicorn_config(
    gate: Gate, host: str, port: int, *, read_timeout_s: float = READ_TIMEOUT_S
) -> uvicorn.Config:
    """uvicorn's settings for ``gate`` on ``host:port`` with the guard of ``scaler.http_limits``
    (the read deadline from a request's first byte; answers ``{"message": ...}`` as the gate's)."""
    guard = ConnectionGuard(
        read_timeout_s,
        LIMIT_CONCURRENCY,
        LIMIT_PER_CLIENT,
        from_first_byte=True,
        error_key="message",
        logger=logging.getLogger("scaler.gate"),
    )
    return uvicorn.Config(
        gate,
        host=host,
        port=port,
        http=guarded_protocol(guard),
        ws="none",
        lifespan="on",  # the gate's snapshot follows the engine from the server's start
        access_log=False,
        server_header=False,
        limit_concurrency=None,  # the guard's caps (uvicorn's would count slow readers too)
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=16 * 1024,
    )
