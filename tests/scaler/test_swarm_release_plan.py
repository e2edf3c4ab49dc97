"""release_plan: when lowering a Swarm service's count removes exactly the released slots.

The rules are swarmkit's (manager/orchestrator/replicated/services.go and slot.go, restart.go):
the orchestrator counts a slot while a task of it is meant to run or stopped for good (exited 0
under ``on-failure``), and on a lower count removes the tail of the counted slots sorted by
their number on their node (running ones numbered first; -1, sorted last, for a slot with no
node yet). The tests/swarm suite runs the real thing; these pin the decision on task listings.
"""

from __future__ import annotations

from scaler.backends.swarm import (
    STABLE_TIES_BEFORE,
    ReleasePlan,
    SwarmService,
    SwarmTask,
    release_plan,
)


def task(
    slot: int,
    node: str,
    desired: str = "running",
    state: str = "running",
    condition: str = "on-failure",
    max_attempts: int = 0,
) -> SwarmTask:
    return SwarmTask(
        id=f"t{slot}{node}{state}",
        slot=slot,
        node_id=node,
        desired=desired,
        state=state,
        container_id=f"c{slot}{node}",
        exit_code=None,
        message="",
        condition=condition,
        max_attempts=max_attempts,
    )


def drained(slot: int, node: str) -> SwarmTask:
    """A drained worker's task: exited 0, Swarm set it to shut down and will not restart it."""
    return task(slot, node, desired="shutdown", state="complete")


def service(replicas: int, *tasks: SwarmTask, update: str = "") -> SwarmService:
    return SwarmService("id", "st_worker-io", 7, replicas, tuple(tasks), update)


def test_one_worker_per_node_releases_the_drained_slot() -> None:
    view = service(3, task(1, "a"), task(2, "b"), drained(3, "c"))
    assert release_plan(view, set()) == ReleasePlan((3,), 2)


def test_the_drained_slot_on_the_busiest_node_goes_first() -> None:
    view = service(4, task(1, "a"), task(2, "a"), drained(3, "a"), task(4, "b"))
    assert release_plan(view, set()) == ReleasePlan((3,), 3)


def test_a_released_slot_on_a_quieter_node_waits_swarm_would_pick_a_running_one() -> None:
    # Swarm numbers the two on node a 1 and 2 and the drained one on b 1: it removes a's second.
    view = service(3, task(1, "a"), task(2, "a"), drained(3, "b"))
    reason = release_plan(view, set())
    assert isinstance(reason, str) and "running slot first" in reason


def test_a_replacement_not_yet_placed_blocks_it_swarm_removes_that_first() -> None:
    # The CI failure: node c lost, its slot 3 replaced by a task with no node yet (numbered -1).
    view = service(
        4,
        task(1, "a"),
        task(2, "b"),
        task(3, "c", desired="shutdown", state="running"),  # the lost node's, being replaced
        task(3, "", state="pending"),
        drained(4, "b"),
    )
    reason = release_plan(view, {"c"})
    assert isinstance(reason, str) and "slot 3 not settled" in reason
    # Once the replacement runs on a ready node, the drained slot can go.
    settled = service(
        4,
        task(1, "a"),
        task(2, "b"),
        task(3, "c", desired="shutdown", state="running"),
        task(3, "a"),
        drained(4, "b"),
    )
    assert release_plan(settled, {"c"}) == ReleasePlan((4,), 3)


def test_a_task_still_running_on_a_node_that_is_down_blocks_it() -> None:
    view = service(3, task(1, "a"), task(2, "c"), drained(3, "b"))
    reason = release_plan(view, {"c"})
    assert isinstance(reason, str) and "down" in reason


def test_two_drained_slots_go_together() -> None:
    view = service(4, task(1, "a"), drained(2, "a"), task(3, "b"), drained(4, "b"))
    assert release_plan(view, set()) == ReleasePlan((2, 4), 2)


def test_a_failed_task_is_restarted_not_released() -> None:
    view = service(3, task(1, "a"), task(2, "b"), task(3, "c", state="failed"))
    reason = release_plan(view, set())
    assert reason == "no released slot" or "not settled" in str(reason)


def test_a_count_swarm_has_not_reconciled_yet_waits() -> None:
    view = service(4, task(1, "a"), task(2, "b"), drained(3, "c"))
    reason = release_plan(view, set())
    assert isinstance(reason, str) and "not reconciled" in reason


def test_a_rolling_update_or_an_unknown_restart_history_waits() -> None:
    view = service(3, task(1, "a"), task(2, "b"), drained(3, "c"), update="updating")
    assert isinstance(release_plan(view, set()), str)
    counted = service(3, task(1, "a"), task(2, "b"), drained(3, "c"))
    limited = service(
        3,
        task(1, "a"),
        task(2, "b"),
        task(3, "c", desired="shutdown", state="failed", max_attempts=3),
    )
    assert isinstance(release_plan(counted, set()), ReleasePlan)
    reason = release_plan(limited, set())
    assert isinstance(reason, str) and "max_attempts" in reason


def test_equal_numbers_rely_on_the_stable_sort_only_up_to_its_bound() -> None:
    small = [task(i, f"n{i}") for i in range(1, STABLE_TIES_BEFORE)]
    view = service(len(small) + 1, *small, drained(99, "x"))
    assert isinstance(release_plan(view, set(), STABLE_TIES_BEFORE), ReleasePlan)
    large = [task(i, f"n{i}") for i in range(1, STABLE_TIES_BEFORE + 1)]
    view = service(len(large) + 1, *large, drained(99, "x"))
    assert isinstance(release_plan(view, set(), STABLE_TIES_BEFORE), str)
    assert isinstance(release_plan(view, set(), 12), ReleasePlan)
