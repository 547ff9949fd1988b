"""The on-disk spool: write, fsync, rename; and the quarantine beside it.

Layout under ``spool_dir`` (a protocol between this module and the DB's ``instances.spool_path``)::

    .incoming/<random>.part                      staged, fsynced, not yet acknowledged
    studies/<study_uid>/<series_uid>/<sop_uid>.dcm
    studies/<study_uid>/<series_uid>/<sop_uid>.<sha256[:16]>.dcm   a conflicting second copy

A UID that is not a conformant UID (PS3.5 9.1) is never used as a path: it is replaced by ``x`` and the
first 32 hex digits of its SHA-256. Quarantine entries are ``<quarantine_dir>/<UTC stamp>-<name>`` with a
``.reason.txt`` beside each. Nothing is deleted except a staged copy that turned out to be an identical
duplicate of a file already in the spool, a partial write that failed and was never acknowledged, or an
empty staged file (nothing was written to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from gateway.model import InstanceHeader, StagedFile, is_valid_uid

COPY_CHUNK_BYTES = 1 << 20



def printable(text: object) -> str:
    """A path or a text as it can be written anywhere (a reason file, a log, the database): bytes of a file
    name that are not UTF-8 (``os.fsdecode`` keeps them as surrogates) shown as ``\\xff``."""
    return os.fsencode(str(text)).decode("utf-8", "backslashreplace") if isinstance(text, (str, Path)) else str(text)

class SpoolFull(OSError):
    """The spool's file system has no room (ENOSPC/EDQUOT/EFBIG): answer Out of Resources."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_component(uid: str) -> str:
    if is_valid_uid(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:32]


class Spool:
    """Durable file placement for one spool directory (thread-safe: no shared mutable state)."""

    def __init__(self, spool_dir: Path, quarantine_dir: Path) -> None:
        self.root = spool_dir
        self.staging_dir = spool_dir / ".incoming"
        self.studies_dir = spool_dir / "studies"
        self.quarantine_dir = quarantine_dir
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def start(self) -> list[Path]:
        """Create the directories; move staged files left by a crash into quarantine (never acknowledged).
        An empty one holds nothing (a spare an association opened for its next instance) and is removed."""
        for directory in (self.staging_dir, self.studies_dir, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        leftovers = []
        for part in sorted(self.staging_dir.glob("*.part")):
            try:
                empty = part.stat().st_size == 0
            except FileNotFoundError:
                continue
            if empty:
                _remove_quietly(part)
            else:
                leftovers.append(part)
        return [
            self.quarantine(p, "staged write left behind by an earlier run that stopped before acknowledging it")
            for p in leftovers
        ]

    # -- staging --------------------------------------------------------------------------------
    def stage_bytes(self, chunks: Iterable[bytes | memoryview], durable: bool = True) -> StagedFile:
        """Write ``chunks`` to a new staged file, fsync it (unless ``durable`` is False: then the caller
        passes it to :meth:`make_durable` before placing it), and return its size and SHA-256."""
        writer = self.open_staged()
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.close(durable)

    def open_staged(self, hashed: bool = True) -> StagedWriter:
        """A new staged file to write piece by piece (a data set as its PDVs arrive). ``hashed`` False: no
        SHA-256 as it is written; :meth:`StagedWriter.close_deferred` hashes it beside its fsync instead."""
        return StagedWriter(self.staging_dir / f"{uuid.uuid4().hex}.part", hashed)

    @property
    def fsync_pool(self) -> Executor:
        """Threads that fsync staged files while their writer goes on (``StagedWriter.close_deferred``)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
            return self._pool

    def free_bytes(self) -> int:
        """Bytes free for this process on the spool's file system (``statvfs``: the blocks available to an
        unprivileged writer; a root process may use the file system's reserved blocks beyond it)."""
        return shutil.disk_usage(self.root).free

    def stop(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def make_durable(self, staged: list[StagedFile]) -> None:
        """fsync many staged files at once (a few threads: the file system commits them together)."""
        try:
            list(self.fsync_pool.map(lambda f: fsync_file(f.temp_path), staged))
        except OSError as exc:
            raise _as_spool_error(exc) from exc

    def stage_file(self, source: Path) -> StagedFile:
        """Copy ``source`` into staging (streamed, hashed, fsynced); the source is left untouched."""
        with source.open("rb") as fh:
            return self.stage_bytes(iter(lambda: fh.read(COPY_CHUNK_BYTES), b""))

    def discard(self, staged: StagedFile) -> None:
        """Drop a staged copy whose identical bytes are already in the spool."""
        _remove_quietly(staged.temp_path)

    # -- placing --------------------------------------------------------------------------------
    def relative_path(self, header: InstanceHeader, sha256: str, conflict: bool) -> str:
        name = safe_component(header.sop_instance_uid)
        if conflict:
            name = f"{name}.{sha256[:16]}"
        return "/".join(
            ("studies", safe_component(header.study_instance_uid), safe_component(header.series_instance_uid), name + ".dcm")
        )

    def place(self, staged: StagedFile, relative_path: str, sync: bool = True, keep_source: bool = False) -> Path:
        """Rename the staged file to ``relative_path`` and fsync the directory so the name is durable
        (with ``sync`` False the caller fsyncs the directories once for many files: :meth:`sync_dirs`;
        with ``keep_source`` the file is hard-linked instead, and the staged name stays readable)."""
        target = self.root / relative_path
        created = self._move_in(staged, target, keep_source)
        try:
            if sync:
                fsync_dir(target.parent)
            for directory in created:
                fsync_dir(directory.parent)
        except OSError as exc:
            _remove_quietly(staged.temp_path)
            raise _as_spool_error(exc) from exc
        return target

    def place_deferred(self, staged: StagedFile, relative_path: str) -> Callable[..., Path]:
        """Give the staged file the name ``relative_path`` now and fsync its directory on the spool's threads,
        beside the file's own fsync (``StagedWriter.close_deferred``); the wait gives the path once the name
        is durable, or removes the file and raises :class:`SpoolFull`; ``wait(False)`` removes it after the
        fsync (the caller will not record it: its own fsync failed). For a name that needs no
        SHA-256 (a new SOP Instance UID): the row must still wait for both fsyncs; until then a crash leaves
        at most a file without a row, which nothing reads.

        The name is never taken from a file already there (``FileExistsError``, the staged file kept): another
        process of the site may have placed the same UID's bytes there a moment ago, its row not yet
        committed (a rename would replace them, and that row would then name bytes the file no longer holds).
        The caller then waits for the hash and places the file under a name with the hash in it."""
        target = self.root / relative_path
        job = self.fsync_pool.submit(self.sync_dirs, [target, *self._move_in(staged, target, replace=False)])

        def wait(keep: bool = True) -> Path:
            try:
                job.result()
            except BaseException:
                _remove_quietly(target)
                raise
            if not keep:
                _remove_quietly(target)
            return target

        return wait

    def _move_in(self, staged: StagedFile, target: Path, keep_source: bool = False, replace: bool = True) -> list[Path]:
        """Give the staged file its name in the spool (renamed, or hard-linked with ``keep_source``); returns
        the directories made for it. On an error the staged name is removed and :class:`SpoolFull` or
        ``OSError`` raised. With ``replace`` False a file already at the name stays and ``FileExistsError`` is
        raised with the staged file kept (a hard link, then the staged name unlinked: ``rename`` replaces)."""
        try:
            created = _make_dirs(target.parent, self.root)
            if keep_source:
                _remove_quietly(target)  # identical bytes a crash left before their row was committed
                os.link(staged.temp_path, target)
            elif replace:
                os.replace(staged.temp_path, target)
            else:
                os.link(staged.temp_path, target)
                try:
                    os.unlink(staged.temp_path)
                except OSError:
                    _remove_quietly(target)
                    raise
        except FileExistsError:
            if replace:
                _remove_quietly(staged.temp_path)
            raise
        except OSError as exc:
            _remove_quietly(staged.temp_path)
            raise _as_spool_error(exc) from exc
        return created

    def sync_dirs(self, paths: Iterable[Path]) -> None:
        try:
            for directory in sorted({p.parent for p in paths}):
                fsync_dir(directory)
        except OSError as exc:
            raise _as_spool_error(exc) from exc

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    def remove(self, relative_path: str) -> bool:
        """Remove a spool file (the retention policy decided it may go); False if it was already gone."""
        target = (self.root / relative_path).resolve()
        if self.root.resolve() not in target.parents or "inbox" in Path(relative_path).parts[:1]:
            raise ValueError(f"refusing to remove {relative_path!r}: not an instance file under the spool")
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(target.parent)
        return True

    def remove_outbox(self, unit_id: int) -> int:
        """The de-identified copies made for a unit (``adapters.dicom_deid``, under outbox/<unit>/) once it is delivered."""
        import shutil

        target = self.root / "outbox" / str(int(unit_id))
        if not target.is_dir():
            return 0
        count = sum(1 for _ in target.iterdir())
        shutil.rmtree(target)
        return count

    # -- quarantine -----------------------------------------------------------------------------
    def quarantine(self, source: Path, reason: str) -> Path:
        """Move ``source`` into quarantine with a reason file beside it; returns the new path."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.quarantine_dir / f"{stamp}-{source.name}"
        try:
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across(source, target)  # another file system: copied whole and durable, then the source goes
            if source.is_dir():
                shutil.rmtree(source)
                fsync_dir(source.parent)
            else:
                os.unlink(source)
        reason_path = target.with_name(target.name + ".reason.txt")
        partial = target.with_name(target.name + ".reason.part")  # the reason appears whole or not at all
        partial.write_text(f"{printable(reason)}\noriginal path: {printable(source)}\nquarantined at: {stamp}\n",
                           encoding="utf-8")
        fsync_file(partial)
        os.replace(partial, reason_path)
        fsync_dir(self.quarantine_dir)
        return target

    def quarantine_bytes(self, data: bytes, name: str, reason: str) -> Path:
        """Keep bytes that arrived over the network but could not be accepted."""
        staged = self.stage_bytes([data])
        renamed = staged.temp_path.with_name(name)
        os.replace(staged.temp_path, renamed)
        return self.quarantine(renamed, reason)


class StagedWriter:
    """One staged file being written: hashed as it goes; ``close`` fsyncs it and returns the StagedFile,
    ``abort`` removes it. Errors are raised as :class:`SpoolFull` or ``OSError`` and leave nothing behind."""

    def __init__(self, temp_path: Path, hashed: bool = True) -> None:
        self.temp_path = temp_path
        self._digest = hashlib.sha256() if hashed else None
        self.size = 0
        try:
            self._fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise _as_spool_error(exc) from exc

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        if self._digest is not None:
            self._digest.update(view)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self.abort()
            raise _as_spool_error(exc) from exc
        self.size += len(chunk)

    def close_deferred(self, pool: Executor) -> tuple[StagedFile, Callable[[], StagedFile]]:
        """Close with the fsync running on ``pool``: (the file, a wait that raises the fsync's error and then
        leaves nothing behind, else gives the file). Its size is known at once, so the caller's duplicate
        lookup runs while the disk writes (``gateway.service.IngestService.ingest``, ``durable``). A writer
        that did not hash as it wrote (``hashed`` False) has its file hashed on ``pool`` beside the fsync (read
        back from the page cache: the writer's own thread, which reads the network, does not spend the ~0.3
        ms of a CT slice's SHA-256 on it); its SHA-256 is in the file the wait gives."""
        fd, self._fd = self._fd, -1
        pending = [pool.submit(fsync_and_close, fd)]
        if self._digest is None:  # read through a descriptor of its own: the file may be renamed meanwhile
            pending.append(pool.submit(_sha256_and_close, _reader(self.temp_path)))
        staged = StagedFile(temp_path=self.temp_path, size_bytes=self.size,
                            sha256=self._digest.hexdigest() if self._digest is not None else "")

        def wait() -> StagedFile:
            try:
                digests = [job.result() for job in pending][1:]
            except OSError as exc:
                for job in pending:  # every job is over before the file goes
                    with contextlib.suppress(BaseException):
                        job.result()
                _remove_quietly(self.temp_path)
                raise _as_spool_error(exc) from exc
            return dataclasses.replace(staged, sha256=digests[0]) if digests else staged

        return staged, wait

    def close(self, durable: bool = True) -> StagedFile:
        try:
            if durable:
                os.fsync(self._fd)
            os.close(self._fd)
        except OSError as exc:
            self.abort()
            raise _as_spool_error(exc) from exc
        self._fd = -1
        digest = self._digest.hexdigest() if self._digest is not None else sha256_of(self.temp_path)
        return StagedFile(temp_path=self.temp_path, size_bytes=self.size, sha256=digest)

    def abort(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        _remove_quietly(self.temp_path)


def _copy_across(source: Path, target: Path) -> None:
    """Copy a file or a folder (a rejected inbound bundle) to ``target`` on another file system: under a
    temporary name, every file and folder fsynced, then renamed, so that ``target`` is whole or absent."""
    partial = target.with_name(target.name + ".copying")
    if source.is_dir():
        shutil.copytree(source, partial)
        for folder, _subfolders, names in os.walk(partial):
            for name in names:
                fsync_file(Path(folder) / name)
            fsync_dir(Path(folder))
    else:
        shutil.copy2(source, partial)
        fsync_file(partial)
    os.replace(partial, target)
    fsync_dir(target.parent)


def _make_dirs(directory: Path, root: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (parents first) so their entries can be fsynced."""
    missing: list[Path] = []
    current = directory
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            pass
    return created


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file."""
    return _sha256_and_close(open(path, "rb"))


def _reader(path: Path) -> BinaryIO | OSError:
    """The file opened for reading, or why it could not be (raised where the hash is waited for)."""
    try:
        return open(path, "rb")
    except OSError as exc:
        return exc


def _sha256_and_close(fh: BinaryIO | OSError) -> str:
    if isinstance(fh, OSError):
        raise fh
    with fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_and_close(fd: int) -> None:
    """fsync an open descriptor and close it (on a spool thread, while its writer goes on)."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file by name (it was written and closed before)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _as_spool_error(exc: OSError) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SpoolFull(exc.errno, f"spool file system is full: {exc.strerror}")
    return exc
