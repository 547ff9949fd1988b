"""Refusals counted in memory and written to the audit log later, off the event loop.

A refusal path is a hot path under attack: a flood of offers from a stranger, forged receipts, hostile
connections. :class:`RefusalLog` makes noting one O(1) with no I/O (a dict under a lock, safe from any
thread); :meth:`RefusalLog.drain` hands the counts to a writer (``QueueStore.audit_counts``) that runs on a
worker thread each second, which folds them into one audit row per event, key and minute with a count.
At most ``max_keys`` distinct keys are held between drains; beyond that, refusals are counted under the key
``(others)`` so that memory stays bounded whatever the attacker varies.

The log gets the same treatment: the first refusal of an event and key in ``log_window_s`` is logged (a
WARNING naming address, phase and reason), the rest of the window only counted, and when the window ends
:meth:`RefusalLog.flush_quiet` logs one line with how many more came ("37 more like it from 10.0.0.9 in 60 s").
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from gateway.rows import utcnow


@dataclass
class Tally:
    event: str
    key: str
    detail: str  # the first refusal's text in this batch
    count: int
    first_at: object  # datetime (utcnow) of the first refusal in this batch


log = logging.getLogger(__name__)


class RefusalLog:
    def __init__(self, max_keys: int = 1000, log_window_s: float = 60.0) -> None:
        self.max_keys = max_keys
        self.log_window_s = log_window_s
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._quiet: dict[tuple[str, str], list] = {}  # (event, key) -> [window start, count kept quiet, detail]
        self._lock = threading.Lock()
        self.total = 0  # refusals noted since start (for tests and metrics)

    def note(self, event: str, key: str, detail: str) -> None:
        """One refusal (any thread, no I/O but a log line at most once per key and window)."""
        self.add(event, key, detail, 1)
        self._log_once(event, key, detail)

    def _log_once(self, event: str, key: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            window = self._quiet.get((event, key))
            if window is not None and now - window[0] < self.log_window_s:
                window[1] += 1
                return
            if window is None and len(self._quiet) >= self.max_keys:
                return  # counted in the audit; the log says so at the next flush of a window
            self._quiet[(event, key)] = [now, 0, detail]
        log.warning("%s", detail)

    def flush_quiet(self) -> None:
        """Log how many refusals each ended window kept quiet (one line per key), and forget the window."""
        now = time.monotonic()
        with self._lock:
            ended = [(k, w) for k, w in self._quiet.items() if now - w[0] >= self.log_window_s]
            for k, _w in ended:
                del self._quiet[k]
        for (event, key), (_start, count, detail) in ended:
            if count:
                log.warning("%d more %s like it from %s in the last %.0f s (first: %s)", count, event, key,
                            self.log_window_s, detail)

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
                else:  # the restored tally is the older one: its first refusal's text and time stay
                    kept.count += t.count
                    kept.detail, kept.first_at = t.detail, t.first_at

    def drain(self) -> list[Tally]:
        with self._lock:
            tallies, self._tallies = list(self._tallies.values()), {}
        return tallies

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(t.count for t in self._tallies.values())
