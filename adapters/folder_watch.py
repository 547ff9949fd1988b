"""The watched folder: modalities that can only write files drop them here.

Contract
- Every regular file below ``watch_dir`` (recursively; names starting with "." are ignored as temporary)
  is a candidate: seen through watchdog events, through a scan at start-up, and through a periodic rescan
  (in case events were lost). A candidate is taken only after its size and mtime have not changed for
  ``settle_s``.
- A complete Part-10 file (see ``adapters.dicom_files.inspect_part10_file``) is copied into the spool
  (streamed, fsynced), recorded exactly like a network instance, and only then removed from the watched
  folder: the move is complete when the copy is durable and committed.
- Anything else (not DICOM, truncated, no SOP Instance UID, ...) is moved to the quarantine folder with a
  ``.reason.txt`` and an audit row. Nothing is ever deleted.
- If the spool or the DB fails, the file stays where it is and is tried again after ``retry_s``; so does a
  file that meets any other error: no single file stops the watcher (its last error is in `dicomgw status`).
- File names need not be UTF-8: bytes that are not are shown as ``\xff`` in reasons, logs and the audit.

Threads: watchdog's observer thread only records candidates; one worker thread settles and ingests them.
``on_stored`` is called on the worker thread (the composition root wraps it for the asyncio loop).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from adapters.dicom_files import RejectedFile, inspect_part10_file
from adapters.spool import Spool, printable
from gateway.model import IngestResult
from gateway.outage import said, unreachable
from gateway.service import IngestService

log = logging.getLogger(__name__)

AuditFn = Callable[[str, str], None]


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    unchanged_since: float
    not_before: float = 0.0


class FolderWatcher:
    def __init__(
        self,
        watch_dir: Path,
        ingest: IngestService,
        spool: Spool,
        audit: AuditFn,
        settle_s: float = 2.0,
        scan_interval_s: float = 0.5,
        rescan_s: float = 30.0,
        retry_s: float = 10.0,
        on_stored: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self.watch_dir = watch_dir
        self._ingest = ingest
        self._spool = spool
        self._audit = audit
        self._settle_s = settle_s
        self._scan_interval_s = scan_interval_s
        self._rescan_s = rescan_s
        self._retry_s = retry_s
        self._on_stored = on_stored
        self._candidates: dict[Path, _Candidate | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._worker: threading.Thread | None = None
        self.last_error: str | None = None  # the last unexpected error the worker met (it went on)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.watch_dir.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Events(self._notice), str(self.watch_dir), recursive=True)
        observer.start()
        self._observer = observer
        self._rescan()  # files already there at start-up
        self._worker = threading.Thread(target=self._run, name="folder-watch", daemon=True)
        self._worker.start()
        log.info("watching %s (settle %.1f s)", self.watch_dir, self._settle_s)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._worker is not None:
            self._worker.join(timeout=30)

    # -- candidates -----------------------------------------------------------------------------
    def _notice(self, path: Path) -> None:
        if path.name.startswith("."):
            return
        with self._lock:
            self._candidates.setdefault(path, None)

    def _rescan(self) -> None:
        for root, dirs, files in os.walk(self.watch_dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                self._notice(Path(root) / name)

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def health(self) -> dict[str, object]:
        """For `dicomgw status`: is the worker running, and the last error it went on after."""
        return {"running": self.alive, "watch_dir": printable(self.watch_dir), "last_error": self.last_error}

    def _run(self) -> None:
        """No single file, and no error, ends this loop: an unexpected one is logged, kept for `status`, and
        the file is tried again after ``retry_s`` (it stays where it is)."""
        last_rescan = time.monotonic()
        while not self._stop.wait(self._scan_interval_s):
            try:
                if time.monotonic() - last_rescan >= self._rescan_s:
                    last_rescan = time.monotonic()
                    self._rescan()
                for path in self._settled():
                    if self._stop.is_set():
                        return
                    try:
                        self._take(path)
                    except Exception as exc:
                        self._went_on(exc, path)
                        self._retry_later(path, f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                self._went_on(exc, None)

    def _went_on(self, exc: Exception, path: Path | None) -> None:
        where = f" with {printable(path)}" if path is not None else ""
        self.last_error = f"{type(exc).__name__}{where}: {printable(str(exc))}"[:500]
        log.exception("watched folder: unexpected error%s; going on", where)

    def _settled(self) -> list[Path]:
        now = time.monotonic()
        ready: list[Path] = []
        with self._lock:
            for path, seen in list(self._candidates.items()):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    del self._candidates[path]
                    continue
                if not os.path.isfile(path):
                    del self._candidates[path]
                    continue
                if seen is None or (stat.st_size, stat.st_mtime_ns) != (seen.size, seen.mtime_ns):
                    not_before = seen.not_before if seen else 0.0
                    self._candidates[path] = _Candidate(stat.st_size, stat.st_mtime_ns, now, not_before)
                elif now - seen.unchanged_since >= self._settle_s and now >= seen.not_before:
                    ready.append(path)
        return ready

    # -- taking a file --------------------------------------------------------------------------
    def _take(self, path: Path) -> None:
        try:
            header = inspect_part10_file(path)
        except RejectedFile as exc:
            self._quarantine(path, str(exc))
            return
        except OSError as exc:
            self._retry_later(path, f"cannot read: {exc}")
            return
        source = f"folder:{printable(path.relative_to(self.watch_dir))}"
        try:
            staged = self._spool.stage_file(path)
            if staged.size_bytes != path.stat().st_size:
                self._spool.discard(staged)
                self._retry_later(path, "file changed while it was copied")
                return
            result = self._ingest.ingest(header, staged, source)
        except Exception as exc:  # spool full, DB down: the file stays and is tried again
            if unreachable(exc):  # its retry's line, no traceback: the outage itself is said once (gateway.outage)
                self._retry_later(path, said(exc))
                return
            log.exception("could not ingest %s", printable(path))
            self._retry_later(path, f"{type(exc).__name__}: {exc}")
            return
        os.unlink(path)  # the durable, committed copy in the spool now holds these bytes
        with self._lock:
            self._candidates.pop(path, None)
        log.info("ingested %s from the watched folder (%s)", header.sop_instance_uid, result.outcome.value)
        if self._on_stored is not None:
            self._on_stored(result)

    def _quarantine(self, path: Path, reason: str) -> None:
        try:
            kept = self._spool.quarantine(path, f"watched folder: {reason}")
        except OSError as exc:
            self._retry_later(path, f"quarantine failed: {exc}")
            return
        with self._lock:
            self._candidates.pop(path, None)
        log.warning("quarantined %s: %s", printable(path), reason)
        self._audit("quarantined", f"{printable(path.relative_to(self.watch_dir))}: {printable(reason)}; kept at {printable(kept)}")

    def _retry_later(self, path: Path, why: str) -> None:
        log.warning("will retry %s in %.0f s: %s", printable(path), self._retry_s, printable(why))
        with self._lock:
            seen = self._candidates.get(path)
            if seen is not None:
                seen.not_before = time.monotonic() + self._retry_s


class _Events(FileSystemEventHandler):
    def __init__(self, notice: Callable[[Path], None]) -> None:
        self._notice = notice

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        target = getattr(event, "dest_path", "") or event.src_path
        if event.event_type in ("created", "modified", "moved", "closed"):
            self._notice(Path(os.fsdecode(target)))
