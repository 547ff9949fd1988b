"""Use cases: ingest an instance, mark complete studies stable.

The edges (DICOM SCP, watched folder) stage a file durably, extract its header and call
:meth:`IngestService.ingest`; only when it returns may they acknowledge the instance. The service decides
what the bytes are (new, an identical duplicate, or a conflicting second copy), places the file, and
commits its row. Any exception it raises means "not stored": the edge answers with a failure status.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.model import IngestOutcome, IngestResult, InstanceHeader, StagedFile
from gateway.store import DuplicateInstance, QueueStore

log = logging.getLogger(__name__)


class SpoolPort(Protocol):
    def relative_path(self, header: InstanceHeader, sha256: str, conflict: bool) -> str: ...
    def place(self, staged: StagedFile, relative_path: str, sync: bool = True, keep_source: bool = False) -> Path: ...
    def place_deferred(self, staged: StagedFile, relative_path: str) -> Callable[..., Path]: ...
    def sync_dirs(self, paths: list[Path]) -> None: ...
    def discard(self, staged: StagedFile) -> None: ...
    def absolute(self, relative_path: str) -> Path: ...


LOCK_STRIPES = 64
IN_FLIGHT_S = 5.0  # a file at a UID's plain name this new, with no row yet, is another process's ingest in flight
IN_FLIGHT_POLL_S = 0.005
MAX_LEFT_NOTED = 10_000


class IngestService:
    """Record staged instances; serialises the duplicate check and the placement of one SOP Instance UID
    within one process (a lock per stripe of UIDs: associations storing other instances go on meanwhile;
    across processes the database's unique (UID, SHA-256) decides)."""

    def __init__(self, store: QueueStore, spool: SpoolPort) -> None:
        self._store = store
        self._spool = spool
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._left: set[str] = set()  # spool paths of files placed here whose row failed (see _other_copies)
        self._left_lock = threading.Lock()

    def _lock_for(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[hash(sop_instance_uid) % LOCK_STRIPES]

    def ingest(self, header: InstanceHeader, staged: StagedFile, source: str, origin_peer: str | None = None,
               durable: Callable[[], StagedFile | None] | None = None) -> IngestResult:
        """Place ``staged`` in the spool and record it; returns once the row is committed.

        ``durable``: when the staged file's fsync still runs (``StagedWriter.close_deferred``), waits for it
        (raising its error) and gives the file with its SHA-256 (hashed beside the fsync when its writer did
        not hash it); the duplicate lookup runs while the disk writes. A new SOP Instance UID's file needs no
        hash for its name: it is renamed to it at once and its directory fsynced beside the file's own fsync
        (``place_deferred``); its row waits for both. If a file is already at that name (another process of
        the site placing the same UID, its row not yet committed, or a file a crash left without a row), it
        stays, and this file waits for its hash and goes to a name with the hash in it; another process's
        row is waited for (:meth:`_other_copies`), so that its bytes make this a duplicate or a conflict.
        Otherwise the file is placed or discarded only once it is durable and hashed. On any exception
        nothing was acknowledged: a file not yet durable is removed (the sender still holds the instance); a
        durable placed file whose row failed stays at its path (its commit may have reached the database),
        and the sender's retry is stored beside it without waiting for a row for it.
        """
        placed = False
        relative = ""
        placing: Callable[..., Path] | None = None
        taken = False  # the plain name holds a file with no row we saw: another process's, or a crash's
        try:
            with self._lock_for(header.sop_instance_uid):
                copies = self._store.instance_hashes(header.sop_instance_uid)
                if durable is not None and not copies:  # a new UID's name has no hash in it
                    relative = self._spool.relative_path(header, "", False)
                    try:
                        placing = self._spool.place_deferred(staged, relative)
                    except FileExistsError:
                        taken = True
                if durable is not None:
                    staged = durable() or staged
                if placing is not None:
                    conflict, final_path = False, placing()
                else:
                    if taken:  # what another process recorded meanwhile decides, as in that process
                        copies = self._other_copies(header.sop_instance_uid, relative)  # the plain name, taken
                    if any(sha256 == staged.sha256 for sha256, _ in copies):
                        self._spool.discard(staged)
                        log.info("duplicate %s from %s: identical bytes already stored", header.sop_instance_uid, source)
                        return IngestResult(IngestOutcome.DUPLICATE, 0, header.sop_instance_uid, None)
                    conflict = bool(copies)
                    relative = self._spool.relative_path(header, staged.sha256, conflict or taken)
                    final_path = self._spool.place(staged, relative)
                placed = True
                unit_id = self._store.record_instance(
                    header,
                    spool_path=relative,
                    size_bytes=staged.size_bytes,
                    sha256=staged.sha256,
                    source=source,
                    conflict=conflict,
                    origin_peer=origin_peer,
                )
        except DuplicateInstance:
            self._note_left(relative)
            return IngestResult(IngestOutcome.DUPLICATE, 0, header.sop_instance_uid, None)
        except BaseException:
            if placed:
                self._note_left(relative)
            else:
                if durable is not None:
                    with contextlib.suppress(BaseException):
                        durable()  # the fsync is over (its descriptor closed) before the file goes
                if placing is not None:
                    with contextlib.suppress(BaseException):
                        placing(False)  # renamed but never durable (or its row never written): removed
                self._spool.discard(staged)
            raise
        if conflict:
            log.warning("conflict: %s from %s differs from the stored copy; kept at %s", header.sop_instance_uid, source, relative)
            return IngestResult(IngestOutcome.CONFLICT, unit_id, header.sop_instance_uid, final_path)
        return IngestResult(IngestOutcome.STORED, unit_id, header.sop_instance_uid, final_path)

    def _note_left(self, relative: str) -> None:
        """A file this process placed and left without its row: no ingest is in flight there."""
        with self._left_lock:
            if len(self._left) >= MAX_LEFT_NOTED:
                self._left.clear()  # bounded; a forgotten one costs its retry one wait of IN_FLIGHT_S
            self._left.add(relative)

    def _other_copies(self, sop_instance_uid: str, plain: str) -> list[tuple[str, str]]:
        """The copies recorded of a UID whose plain name holds a file: when no row names that file yet and it
        is new (``IN_FLIGHT_S``), another process of the site is storing the UID right now, between placing
        its file and committing its row: its row is waited for (bounded), so that its bytes decide duplicate
        or conflict here as they would in that process. An older file is what a crash left: not waited for."""
        deadline = time.monotonic() + IN_FLIGHT_S
        while True:
            copies = self._store.instance_hashes(sop_instance_uid)
            if any(path == plain for _sha, path in copies) or time.monotonic() >= deadline or plain in self._left:
                return copies
            try:
                age = time.time() - self._spool.absolute(plain).stat().st_mtime  # its last byte, just before its link
            except OSError:
                return copies  # gone: nothing to wait for
            if age >= IN_FLIGHT_S:
                return copies
            time.sleep(IN_FLIGHT_POLL_S)

    def ingest_batch(self, items: list[tuple[InstanceHeader, StagedFile]], source: str, origin_peer: str | None = None,
                     keep_source: bool = False, received: tuple[int, str, int] | None = None) -> int:
        """Place and record many durable staged files at once (a verified bundle): one directory fsync per
        directory and one transaction for all rows (with ``received``, the receiving unit's move to
        ``received`` too); returns how many were new. Identical duplicates are dropped; conflicting copies are
        kept beside and flagged, as in :meth:`ingest`. If the transaction fails, the placed files stay where
        the identical bytes of a retry will land."""
        with contextlib.ExitStack() as held:  # every stripe, in order (one UID's ingest holds one)
            for lock in self._locks:
                held.enter_context(lock)
            known = self._store.hashes_by_uid(header.sop_instance_uid for header, _ in items)
            rows, placed = [], []
            for header, staged in items:
                copies = known.setdefault(header.sop_instance_uid, set())
                if staged.sha256 in copies:
                    if not keep_source:
                        self._spool.discard(staged)
                    continue
                conflict = bool(copies)
                relative = self._spool.relative_path(header, staged.sha256, conflict)
                placed.append(self._spool.place(staged, relative, sync=False, keep_source=keep_source))
                copies.add(staged.sha256)
                rows.append((header, relative, staged.size_bytes, staged.sha256, conflict))
            self._spool.sync_dirs(placed)
            if rows or received is not None:
                self._store.record_instances(rows, source, origin_peer, received=received)
        return len(rows)


class Feed:
    """One association's hold on the study it is sending (this process): ``unit`` is the unit its last
    instance went to; ``waiting_since`` the monotonic time it began waiting for the modality's next PDU, None
    while the gateway works on one (reads, stores, answers)."""

    __slots__ = ("unit", "waiting_since")

    def __init__(self) -> None:
        self.unit: int | None = None
        self.waiting_since: float | None = None


class CompletenessService:
    """Marks studies stable once no instance arrived for ``stable_age_s`` (PS3.4 has no "study complete").
    The study an open association is sending stays open while the gateway works on that association's next
    PDU or the modality's silence is shorter than ``pause_s`` (default: the stable age): a stall of our own (a
    slow disk, a busy machine) between two instances never splits a study in two units. An association that
    stays open but silent (some modalities keep one for a session) holds nothing beyond ``pause_s``; nor does
    one that went on to another study. Each tick stamps the held units' last instance as now, so that the other
processes of a site on one queue (which do not see this process's feeds) hold them too."""

    def __init__(self, store: QueueStore, stable_age_s: float, clock: Callable[[], float] = time.monotonic,
                 pause_s: float | None = None) -> None:
        self._store = store
        self._stable_age_s = stable_age_s
        self._pause_s = stable_age_s if pause_s is None else pause_s
        self._clock = clock
        self._feeds: set[Feed] = set()
        self._lock = threading.Lock()

    def open_feed(self) -> Feed:
        feed = Feed()
        with self._lock:
            self._feeds.add(feed)
        return feed

    def close_feed(self, feed: Feed) -> None:
        with self._lock:
            self._feeds.discard(feed)

    def held(self) -> list[int]:
        """Units an association is still feeding: its gateway side is busy, or its modality paused for less than
        ``pause_s``."""
        now = self._clock()
        with self._lock:
            feeds = list(self._feeds)
        held = set()
        for feed in feeds:
            unit, since = feed.unit, feed.waiting_since
            if unit is not None and (since is None or now - since < self._pause_s):
                held.add(unit)
        return sorted(held)

    def tick(self) -> list[int]:
        held = self.held()
        self._store.keep_open(held)  # for the other processes of a site on one queue
        moved = self._store.mark_stable(self._stable_age_s, exclude=held)
        if moved:
            log.info("study units now stable: %s", moved)
        return moved
