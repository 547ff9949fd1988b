"""Refusals counted in memory and written to the audit log later, off the event loop.

A refusal path is a hot path under attack: a flood of offers from a stranger, forged receipts, hostile
connections. :class:`RefusalLog` makes noting one O(1) with no I/O (a dict under a lock, safe from any
thread); :meth:`RefusalLog.drain` hands the counts to a writer (``QueueStore.audit_counts``) that runs on a
worker thread each second, which folds them into one audit row per event, key and minute with a count.
At most ``max_keys`` distinct keys are held between drains; beyond that, refusals are counted under the key
``(others)`` so that memory stays bounded whatever the attacker varies.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from gateway.rows import utcnow


@dataclass
class Tally:
    event: str
    key: str
    detail: str  # the first refusal's text in this batch
    count: int
    first_at: object  # datetime (utcnow) of the first refusal in this batch


class RefusalLog:
    def __init__(self, max_keys: int = 1000) -> None:
        self.max_keys = max_keys
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._lock = threading.Lock()
        self.total = 0  # refusals noted since start (for tests and metrics)

    def note(self, event: str, key: str, detail: str) -> None:
        """One refusal (any thread, no I/O)."""
        self.add(event, key, detail, 1)

    def add(self, event: str, key: str, detail: str, count: int) -> None:
        with self._lock:
            self.total += count
            tally = self._tallies.get((event, key))
            if tally is None:
                if len(self._tallies) >= self.max_keys:
                    key, detail = "(others)", f"{detail} (and others: too many distinct sources to list)"
                    tally = self._tallies.get((event, key))
                if tally is None:
                    self._tallies[(event, key)] = Tally(event, key, detail[:2000], count, utcnow())
                    return
            tally.count += count

    def restore(self, tallies: list[Tally]) -> None:
        """Put drained tallies back (their write failed): written at the next drain, not counted twice."""
        with self._lock:
            for t in tallies:
                kept = self._tallies.get((t.event, t.key))
                if kept is None:
                    self._tallies[(t.event, t.key)] = t
                else:
                    kept.count += t.count

    def drain(self) -> list[Tally]:
        with self._lock:
            tallies, self._tallies = list(self._tallies.values()), {}
        return tallies

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(t.count for t in self._tallies.values())
