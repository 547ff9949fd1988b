"""Spool clean-up by policy: only what is confirmed delivered, only after the retention time.

Sender side a unit is ``delivered`` when the receiving gateway's receipt says its PACS holds every instance;
receiver side when its own PACS does (and, if configured, committed to it). Nothing else is ever removed:
not ``sent``, not ``failed``, not the quarantine, not the files of a study routed to several peers until it
is delivered to each. The rows and the audit log stay; the unit shows the time
its files were purged. An identical instance arriving again later is still recognised by its SHA-256.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from gateway.store import QueueStore, utcnow

log = logging.getLogger(__name__)


class RemovablePort(Protocol):
    def remove(self, relative_path: str) -> bool:
        """Remove one spool file; False if it was already gone."""


class SpoolCleaner:
    def __init__(self, store: QueueStore, spool: RemovablePort, keep_delivered_s: float) -> None:
        self.store = store
        self.spool = spool
        self.keep_delivered_s = keep_delivered_s

    def tick(self) -> list[int]:
        if self.keep_delivered_s < 0:
            return []
        purged = []
        for unit in self.store.purgeable(self.keep_delivered_s):
            if self.store.shared_and_pending(unit.unit_id, self.keep_delivered_s):
                continue  # the same files go to another destination too, not yet delivered there
            instances = self.store.unit_instances(unit.unit_id)
            removed = sum(1 for i in instances if self.spool.remove(i.spool_path))
            remove_outbox = getattr(self.spool, "remove_outbox", None)  # de-identified copies sent instead
            if remove_outbox is not None:
                remove_outbox(unit.unit_id)
            self.store.mark_purged(
                unit.unit_id, f"retention {self.keep_delivered_s:g} s after delivery: {removed} of {len(instances)} spool file(s) removed"
            )
            purged.append(unit.unit_id)
        if purged:
            log.info("spool files of delivered units %s removed (retention)", purged)
        return purged


class RowArchiver:
    """Retention of rows: units delivered more than ``keep_rows_days`` ago (their spool files purged, unless the spool
    keeps them for ever) have their instance and transfer rows moved to the archive tables, ``batch`` units per
    transaction so that ingest and the dispatcher wait for one short batch at most, for up to ``budget_s`` per tick.
    Between two batches it pauses ``pause_s``: a writer waiting for SQLite's lock sleeps up to 100 ms between two
    tries (its busy handler), so batches run back to back could take the lock again before it woke, batch after
    batch."""

    def __init__(self, store: QueueStore, keep_rows_days: float, keep_delivered_s: float, batch: int = 100,
                 budget_s: float = 2.0, pause_s: float = 0.1, sleep: Callable[[float], object] = time.sleep) -> None:
        self.store = store
        self.keep_rows_days = keep_rows_days
        self.require_purged = keep_delivered_s >= 0
        self.batch = batch
        self.budget_s = budget_s
        self.pause_s = pause_s
        self._sleep = sleep

    def tick(self) -> int:
        if self.keep_rows_days <= 0:
            return 0
        cutoff = utcnow() - timedelta(days=self.keep_rows_days)
        moved, deadline = 0, time.monotonic() + self.budget_s
        while time.monotonic() < deadline:
            units = self.store.archive_rows(cutoff, self.require_purged, self.batch)
            moved += len(units)
            if len(units) < self.batch:
                break
            self._sleep(self.pause_s)  # the other writers' turn
        if moved:
            log.info("rows of %d unit(s) delivered more than %g day(s) ago moved to the archive", moved, self.keep_rows_days)
        return moved
