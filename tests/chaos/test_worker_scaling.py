"""Scale 1 -> N -> 0 -> N under a backlog with warm shutdowns: nothing stranded, each id once.

This is what the scaler does to worker processes; here the steps are driven directly so the
broker's state can be read at zero workers, the moment a stranded message would show.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
from chaos_environment import ChaosEnv
from chaos_figures import Figures
from exactly_once import absorbed_redeliveries, send_burst, unique_ids, verdict, wait_all_done
from support.polling import poll_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

WAIT = "tasks.io_intensive.wait"
N_WORKERS = 3


def test_scale_one_to_n_to_zero_to_n_under_backlog(
    chaos_env: ChaosEnv, workers: Any, figures: Figures
) -> None:
    figures.fault = f"60 tasks of 0.2 s; workers 1 -> {N_WORKERS} -> 0 -> {N_WORKERS} (SIGTERM)"
    figures.recovery_means = f"scale-up from 0 to the whole burst done on {N_WORKERS} workers"
    app = chaos_env.app()
    queue = chaos_env.queue("io_intensive")
    broker = chaos_env.broker_reader()
    ids = unique_ids("scale", 60)
    send_burst(app, WAIT, ids, lambda t: {"key": t, "duration": 0.2})

    def done() -> int:
        return len(chaos_env.effects.counts(ids))

    running = [workers(chaos_env, ["io_intensive"])]
    poll_until(lambda: done() >= 5, "5 done on one worker")
    running += [workers(chaos_env, ["io_intensive"]) for _ in range(N_WORKERS - 1)]
    poll_until(lambda: done() >= 25, "25 done on several workers")

    for worker in running:  # all at once, as a scale to zero does
        worker.signal(signal.SIGTERM)
    assert [worker.wait_exit(timeout=30) for worker in running] == [0] * N_WORKERS
    at_zero = done()
    assert at_zero < len(ids), "the backlog drained before the scale to zero; nothing was tested"
    # At zero workers every id is either done or waiting: none is held unacked.
    assert broker.unacked() in (0, None)
    waiting = broker.waiting([queue])
    if waiting != len(ids) - at_zero:  # a task ran and its message is back: say which, and why
        logs = "\n".join(f"--- {w.name}\n{w.log()[-6000:]}" for w in running)
        raise AssertionError(f"{at_zero} done but {waiting} of {len(ids)} waiting\n{logs}")
    figures.notes.append(f"{at_zero} done and {len(ids) - at_zero} waiting at zero workers")

    scaled_up = time.monotonic()
    running = [workers(chaos_env, ["io_intensive"]) for _ in range(N_WORKERS)]
    wait_all_done(chaos_env.effects, ids, timeout=60)
    figures.recovery_s = round(time.monotonic() - scaled_up, 2)
    for worker in running:
        worker.signal(signal.SIGTERM)
    assert [worker.wait_exit(timeout=30) for worker in running] == [0] * N_WORKERS

    result = verdict(chaos_env.effects, broker, ids, [queue])
    figures.count(result.sent, result.done, len(result.lost), len(result.duplicated))
    figures.absorbed_redeliveries = absorbed_redeliveries(
        chaos_env.records_url, chaos_env.key_prefix, ids
    )
    result.assert_exactly_once()
    assert figures.absorbed_redeliveries == 0, "a warm shutdown must not cause a redelivery"
