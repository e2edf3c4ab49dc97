"""Checks every simulator run must pass, shared by the engine tests and the time-domain
properties of the decision core (not a test module)."""

from __future__ import annotations

import math

from scaler.simulate.engine import SimResult


def check_invariants(r: SimResult) -> None:
    """What must hold for every run: conservation, order, bounds, start-up, no cut task."""
    lives = {(life.service, life.id): life for life in r.replicas}
    for log in r.tasks.values():
        started = len(log.start)
        assert len(log.replica) == started <= len(log.publish)
        for i in range(started):
            p, s, e = log.publish[i], log.start[i], log.end[i]
            assert s >= p
            life = lives[(log.service, log.replica[i])]
            assert life.ready is not None and s >= life.ready  # only ready replicas consume
            if not math.isnan(e):
                assert e >= s
                if life.drain_start is not None:  # drained only once idle: the task was done
                    assert e <= life.drain_start
            if life.drain_start is not None:
                assert s < life.drain_start or s == life.drain_start == p
        starts = list(log.start)
        assert starts == sorted(starts)  # FIFO: ids start in publish order
        assert all(math.isnan(e) for e in log.end[started:])
    for st_ in r.steps:
        sp = r.policy.services[st_.service]
        assert 0 <= st_.replicas <= sp.max_replicas
        assert 0 <= st_.warm <= sp.warm, st_  # the pool never grows past the policy's size
        assert st_.replicas + st_.warm <= sp.max_replicas, st_  # and counts against the max
        assert st_.starting <= st_.replicas
