"""Group commit: the small write transactions of many threads (one per association) run as one.

Each association's thread records its instance before it answers the modality, and that row must be committed
(on disk) first. With several associations at once, their commits used to queue for the database's write
lock: SQLite's busy handler sleeps 1, 2, 5, 10 ... ms between looks, so a waiter slept well past the commit it
waited for, and every commit paid its own fsync. Here the threads queue in this process instead:

- ``submit(item)`` puts the item in the pending list and waits for the one running batch to end;
- the first thread to get the turn takes every pending item (its own and those that came while the last
  batch ran) and runs them through ``run_batch`` in one transaction: one commit, one fsync;
- each thread returns once the batch holding its item has committed, with its own result.

A batch that fails commits none of its items. An error that may be one item's own (``per_item``: a
constraint another process's row meets) sends each item through again alone, so that it reaches only the
thread whose item causes it, as without grouping. Any other error (the database locked past its timeout, the
disk) is every item's: each thread raises it (a copy, chained to the batch's) without trying again, so that a
database that is down costs each association one wait, not one wait per association in turn.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Request(Generic[Item, Result]):
    __slots__ = ("error", "item", "result", "state")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.result: Result | None = None
        self.error: Exception | None = None
        self.state = "pending"  # then "done", "alone" (its batch failed: run again by itself) or "failed"


class GroupCommit(Generic[Item, Result]):
    """``run_batch(items)`` writes and commits the items in one transaction and returns one result per item, in
    order; it runs on the calling threads, one batch at a time. ``per_item(error)``: whether a failed batch's
    error may belong to one of its items only."""

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], per_item: Callable[[Exception], bool]) -> None:
        self._run_batch = run_batch
        self._per_item = per_item
        self._turn = threading.Lock()  # held by the thread running a batch
        self._pending_lock = threading.Lock()
        self._pending: list[_Request[Item, Result]] = []
        self.batches = 0  # batches run (a count for tests and benchmarks)

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a batch."""
        with self._pending_lock:
            return len(self._pending)

    def submit(self, item: Item) -> Result:
        """The item's result once the transaction holding it has committed; its error otherwise."""
        request: _Request[Item, Result] = _Request(item)
        with self._pending_lock:
            self._pending.append(request)
        with self._turn:
            if request.state == "pending":
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._run(batch)
            if request.state == "alone":
                return self._run_batch([item])[0]
        if request.state == "failed":
            assert request.error is not None
            raise _own_copy(request.error) from request.error
        return request.result  # type: ignore[return-value]

    def _run(self, batch: list[_Request[Item, Result]]) -> None:
        """Run ``batch`` on this thread (the leader's); an error that is every item's is raised here too."""
        self.batches += 1
        try:
            results = self._run_batch([r.item for r in batch])
        except Exception as exc:
            alone = len(batch) > 1 and self._per_item(exc)
            for request in batch:
                request.state, request.error = ("alone", None) if alone else ("failed", exc)
            if not alone:
                raise
            return
        except BaseException:  # the leader's thread ends: the others run their items alone
            for request in batch:
                request.state = "alone"
            raise
        for request, result in zip(batch, results, strict=True):
            request.result, request.state = result, "done"


def _own_copy(error: Exception) -> Exception:
    """An exception of the same type and text for another thread to raise (one object raised in several threads
    at once would gather their tracebacks); the object itself when it cannot be copied."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:
        return error
