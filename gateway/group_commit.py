"""Group commit: the small write transactions of many threads (one per association) run as one.

Each association's thread records its instance before it answers the modality, and that row must be committed
(on disk) first. With several associations at once, their commits used to queue for the database's write
lock: SQLite's busy handler sleeps 1, 2, 5, 10 ... ms between looks, so a waiter slept well past the commit it
waited for, and every commit paid its own fsync. Here the threads queue in this process instead:

- ``submit(item)`` puts the item in the pending list and waits for the one running batch to end;
- the first thread to get the turn takes every pending item (its own and those that came while the last
  batch ran) and runs them through ``run_batch`` in one transaction: one commit, one fsync;
- each thread returns once the batch holding its item has committed, with its own result.

A batch that fails (one item's constraint, the database gone) decides nothing for its items: each is run
again alone, so the error reaches only the thread whose item causes it, as without grouping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Request(Generic[Item, Result]):
    __slots__ = ("item", "result", "state")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.result: Result | None = None
        self.state = "pending"  # then "done", or "alone" (its batch failed: run again by itself)


class GroupCommit(Generic[Item, Result]):
    """``run_batch(items)`` writes and commits the items in one transaction and returns one result per item, in
    order; it runs on the calling threads, one batch at a time."""

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]]) -> None:
        self._run_batch = run_batch
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
        """The item's result once the transaction holding it has committed; its own error otherwise."""
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
        return request.result  # type: ignore[return-value]

    def _run(self, batch: list[_Request[Item, Result]]) -> None:
        try:
            self.batches += 1
            results = self._run_batch([r.item for r in batch])
        except BaseException as exc:
            for request in batch:
                request.state = "alone"
            if len(batch) == 1 or not isinstance(exc, Exception):
                raise  # its own item's error (or the thread's end): the others, if any, run alone
            return
        for request, result in zip(batch, results, strict=True):
            request.result, request.state = result, "done"
