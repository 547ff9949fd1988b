"""Group commit (gateway.group_commit): the items that wait while a batch runs go together in the next one, each
thread gets its own result, and a failed batch's items run again alone so that an error reaches only its own
thread. A fake batch runner stands in for the database (the real one: tests/integration/test_queue.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from gateway.group_commit import GroupCommit


class Batches:
    """Runs batches as the database would; the first waits on ``gate`` (a commit still on its way to the disk);
    an item "bad" fails the batch it is in with a constraint (ValueError), an item "down" with OSError (the
    database gone)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[list[str]] = []

    def __call__(self, items: list[str]) -> list[str]:
        first = not self.seen
        self.seen.append(list(items))
        if first:
            assert self.gate.wait(30)
        if "bad" in items:
            raise ValueError("constraint failed for bad")
        if "down" in items:
            raise OSError(5, "database gone")
        return [f"{item} committed" for item in items]


def in_thread(fn: Callable[[], Any], results: dict[str, Any], name: str) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = fn()
        except Exception as exc:  # the thread's own error, kept for the test to read
            results[name] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        done.wait(0.005)
    raise AssertionError("condition not met in time")


def constraint(exc: Exception) -> bool:
    return isinstance(exc, ValueError)


def behind_a_running_batch(batches: Batches, items: list[str]) -> tuple[GroupCommit[str, str], dict[str, Any]]:
    """"first" runs alone and holds its batch; ``items`` are submitted meanwhile and wait; then the held batch
    ends and every thread's answer is collected."""
    group: GroupCommit[str, str] = GroupCommit(batches, per_item=constraint)
    results: dict[str, Any] = {}
    threads = [in_thread(lambda: group.submit("first"), results, "first")]
    until(lambda: len(batches.seen) == 1)
    for item in items:
        threads.append(in_thread(lambda item=item: group.submit(item), results, item))  # type: ignore[misc]
    until(lambda: group.waiting == len(items))
    batches.gate.set()
    for thread in threads:
        thread.join(30)
    return group, results


def test_items_that_wait_while_a_batch_runs_are_committed_together_each_with_its_own_result() -> None:
    batches = Batches()
    group, results = behind_a_running_batch(batches, ["a", "b", "c"])
    assert batches.seen[0] == ["first"] and sorted(batches.seen[1]) == ["a", "b", "c"] and len(batches.seen) == 2
    assert results == {name: f"{name} committed" for name in ("first", "a", "b", "c")}
    assert group.batches == 2 and group.waiting == 0


def test_a_failed_batch_runs_its_items_alone_and_the_error_reaches_only_its_own_thread() -> None:
    batches = Batches()
    _group, results = behind_a_running_batch(batches, ["a", "bad", "c"])
    assert sorted(batches.seen[1]) == ["a", "bad", "c"]
    assert sorted(map(tuple, batches.seen[2:])) == [("a",), ("bad",), ("c",)]  # each again, alone
    assert results["a"] == "a committed" and results["c"] == "c committed" and results["first"] == "first committed"
    assert isinstance(results["bad"], ValueError)


def test_a_batch_that_fails_for_all_its_items_gives_each_thread_the_error_without_running_them_again() -> None:
    """The database gone (not one item's constraint): every thread of the batch gets that error at once, each its
    own copy chained to the batch's, instead of each trying again in turn behind the others."""
    batches = Batches()
    _group, results = behind_a_running_batch(batches, ["a", "down", "c"])
    assert len(batches.seen) == 2 and sorted(batches.seen[1]) == ["a", "c", "down"]  # nothing run again
    errors = [results[name] for name in ("a", "down", "c")]
    assert all(isinstance(e, OSError) and e.errno == 5 and "database gone" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 3 and sum(e.__cause__ is not None for e in errors) >= 2
    assert results["first"] == "first committed"


def test_one_items_error_is_raised_to_its_caller() -> None:
    batches = Batches()
    batches.gate.set()
    group: GroupCommit[str, str] = GroupCommit(batches, per_item=constraint)
    with pytest.raises(ValueError, match="bad"):
        group.submit("bad")
    assert group.submit("next") == "next committed"  # the group goes on
