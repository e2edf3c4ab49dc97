"""The mechanisms every backend and the simulator share, as pure functions (no workers needed).

The warm pool's plan (``scaler.backends.warm_pool``), the scale-down's removal order
(``scaler.backends.removal``) and a service's queue totals (``scaler.decide.queue_totals``):
the rules of their docstrings, checked once here instead of once per backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from scaler.backends.removal import removal_order
from scaler.backends.warm_pool import commit_count, pool_room, pool_target, trim_order
from scaler.decide import queue_totals
from scaler.observations import QueueSignal

small = st.integers(min_value=0, max_value=12)


@dataclass
class Member:
    number: int
    booted: bool
    tasks: int = 0


@given(need=small, booting=small, members=small, warm=small)
def test_commits_take_only_what_the_pool_would_lose(
    need: int, booting: int, members: int, warm: int
) -> None:
    n = commit_count(need, booting, members, warm)
    assert 0 <= n <= min(need, booting)
    assert members - n >= min(members, warm)  # never below what the pool keeps
    if need and booting and members > warm:
        assert n > 0


def test_commits_as_the_backends_counted_them() -> None:
    # 1 short, 2 booting, 3 members (+ drains on their way in) for a pool of 1: 1 committed.
    assert commit_count(1, 2, 3, 1) == 1
    assert commit_count(3, 2, 3, 1) == 2  # no more than are booting
    assert commit_count(3, 2, 2, 2) == 0  # the pool keeps them all


@given(warm=small, members=small)
def test_a_scale_down_refills_the_pool_only_to_its_size(warm: int, members: int) -> None:
    assert pool_room(warm, members) == max(0, warm - members)


@given(warm=small, after=small, desired=small)
def test_serving_plus_warm_stays_within_what_was_decided(
    warm: int, after: int, desired: int
) -> None:
    target = pool_target(warm, after, desired)
    assert 0 <= target <= warm
    assert max(after, desired) + target <= max(desired + warm, after)


def test_a_shrinking_pool_stops_booting_members_first_then_the_highest() -> None:
    members = [Member(1, True), Member(4, False), Member(3, True), Member(2, False)]
    order = trim_order(members, lambda m: m.booted, lambda m: m.number)
    assert [m.number for m in order] == [4, 2, 3, 1]


def test_a_scale_down_removes_the_idlest_then_the_highest() -> None:
    replicas = [Member(1, True, 0), Member(2, True, 3), Member(3, True, 0), Member(4, True, 1)]
    order = removal_order(replicas, lambda m: m.tasks, lambda m: m.number)
    assert [m.number for m in order] == [3, 1, 4, 2]


def test_queue_totals_sum_every_queue_with_unknowns_as_zero() -> None:
    signals = [
        QueueSignal("a", 3, 2, 1.0, 0.0),
        QueueSignal("b", None, 4, None, 0.0),
        QueueSignal("c", 5, None, 2.0, 0.0),
    ]
    assert queue_totals(signals) == (8, 6)
    assert queue_totals([]) == (0, 0)
