"""The ingest hot path's pieces on real files and a real queue database (SQLite and PostgreSQL):
the staged file's fsync running beside the duplicate check (``StagedWriter.close_deferred``), the lock per
stripe of SOP Instance UIDs (``IngestService``), and what a restart finds in the staging directory."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from adapters.spool import Spool, SpoolFull
from gateway.model import IngestOutcome, InstanceHeader
from gateway.service import IngestService
from gateway.store import QueueStore


def header(sop: str, study: str = "1.2.3") -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        study_instance_uid=study, series_instance_uid=f"{study}.1", patient_name="DOE^JANE", study_description="CT",
        modality="CT", series_number=1, instance_number=1,
    )


def staged(spool: Spool, data: bytes):
    writer = spool.open_staged()
    writer.write(data)
    return writer.close_deferred(spool.fsync_pool)


def test_deferred_close_gives_size_and_hash_at_once_and_the_file_after_the_wait(spool: Spool) -> None:
    data = os.urandom(300_000)
    file, durable = staged(spool, data)
    assert (file.size_bytes, file.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    durable()
    durable()  # a second wait is harmless (ingest's error path may wait again)
    assert file.temp_path.read_bytes() == data


def test_a_writer_that_does_not_hash_as_it_writes_gets_its_sha256_from_the_wait(spool: Spool) -> None:
    """The SCP's writers leave the SHA-256 to the spool's threads (read back beside the fsync, off the thread
    that reads the network): the wait gives the file with the digest of exactly what was written."""
    data = os.urandom(700_000)
    writer = spool.open_staged(hashed=False)
    for start in range(0, len(data), 16_384):  # as PDV fragments come
        writer.write(data[start : start + 16_384])
    file, durable = writer.close_deferred(spool.fsync_pool)
    assert file.size_bytes == len(data)
    done = durable()
    assert (done.temp_path, done.size_bytes, done.sha256) == (file.temp_path, len(data), hashlib.sha256(data).hexdigest())


def test_a_failed_fsync_is_spool_full_and_leaves_nothing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("adapters.spool.os.fsync", full)
    file, durable = staged(spool, b"x" * 1000)
    with pytest.raises(SpoolFull):
        durable()
    assert not file.temp_path.exists()
    assert list(spool.staging_dir.iterdir()) == []


def unhashed(spool: Spool, data: bytes):
    writer = spool.open_staged(hashed=False)  # as the SCP writes: hashed on the spool's threads
    writer.write(data)
    return writer.close_deferred(spool.fsync_pool)


def test_a_new_uid_is_renamed_before_its_fsync_ends_and_recorded_with_the_hash_of_what_was_written(
    store: QueueStore, spool: Spool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new UID's file goes to its name while its fsync and its hash still run (the name has no hash in it);
    the hash reads the bytes through a descriptor of its own, so the rename cannot take them away, and the
    row follows once the file and its directory are durable."""
    data = os.urandom(400_000)
    release, order = threading.Event(), []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            assert release.wait(30)  # the file's fsync is still running when the service renames it
        order.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr("adapters.spool.os.fsync", slow_fsync)
    file, durable = unhashed(spool, data)
    service = IngestService(store, spool)
    done: list[object] = []
    worker = threading.Thread(target=lambda: done.append(service.ingest(header("1.2.3.9"), file, "AE", durable=durable)))
    worker.start()
    target = spool.absolute(spool.relative_path(header("1.2.3.9"), "", False))
    for _ in range(3000):  # bounded: the rename comes before the fsync ends (a hard link, then the staged name
        if target.exists() and not file.temp_path.exists():  # unlinked: a busy machine may look between the two)
            break
        threading.Event().wait(0.01)
    assert target.exists() and not file.temp_path.exists()
    assert store.instance_hashes("1.2.3.9") == []  # no row while the file is not yet durable
    release.set()
    worker.join(60)
    assert done and done[0].outcome == IngestOutcome.STORED  # type: ignore[attr-defined]
    assert order.count("file") == 1 and "dir" in order  # the new directories too
    assert store.instance_hashes("1.2.3.9") == [(hashlib.sha256(data).hexdigest(), spool.relative_path(header("1.2.3.9"), "", False))]
    assert target.read_bytes() == data


@pytest.mark.parametrize("failing", ["file", "dir"])
def test_a_new_uid_whose_fsync_fails_after_its_rename_leaves_no_file_and_no_row(
    store: QueueStore, spool: Spool, monkeypatch: pytest.MonkeyPatch, failing: str,
) -> None:
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if ("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("adapters.spool.os.fsync", full)
    file, durable = unhashed(spool, os.urandom(50_000))
    with pytest.raises(SpoolFull):
        IngestService(store, spool).ingest(header("1.2.3.8"), file, "AE", durable=durable)
    assert store.instance_hashes("1.2.3.8") == []
    assert not spool.absolute(spool.relative_path(header("1.2.3.8"), "", False)).exists()
    assert list(spool.staging_dir.iterdir()) == []


def test_a_file_that_cannot_be_opened_for_its_hash_is_an_error_at_the_wait_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_descriptors(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    writer = spool.open_staged(hashed=False)
    writer.write(b"x" * 1000)
    monkeypatch.setattr("adapters.spool.open", no_descriptors, raising=False)
    file, durable = writer.close_deferred(spool.fsync_pool)  # the association goes on reading its socket
    with pytest.raises(OSError, match="Too many open files"):
        durable()
    assert not file.temp_path.exists() and list(spool.staging_dir.iterdir()) == []


def test_restart_quarantines_a_staged_write_and_removes_an_empty_spare(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    spool.start()
    (spool.staging_dir / "a.part").write_bytes(b"half an instance")
    (spool.staging_dir / "b.part").write_bytes(b"")  # a spare an association had opened for its next instance
    kept = Spool(tmp_path / "spool", tmp_path / "quarantine").start()
    assert [p.read_bytes() for p in kept] == [b"half an instance"]
    assert list(spool.staging_dir.iterdir()) == []


@pytest.mark.parametrize("same_bytes", [True, False], ids=["identical", "different"])
def test_one_uid_from_eight_threads_at_once(store: QueueStore, spool: Spool, same_bytes: bool) -> None:
    """Eight associations store the same SOP Instance UID at the same moment, each with its fsync still running:
    identical bytes are kept once (seven duplicates); different bytes are each kept at a path of their own,
    the first plain and the others flagged as conflicts, each row naming its own bytes."""
    service = IngestService(store, spool)
    payloads = [b"same" * 1000 if same_bytes else os.urandom(4000) for _ in range(8)]
    results: list[object] = [None] * 8
    start = threading.Barrier(8)

    def one(i: int) -> None:
        file, durable = staged(spool, payloads[i])
        start.wait()
        results[i] = service.ingest(header("1.2.3.4"), file, f"AE{i}", durable=durable)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    outcomes = sorted(r.outcome.value for r in results)  # type: ignore[union-attr]
    rows = store.instance_hashes("1.2.3.4")
    if same_bytes:
        assert outcomes == sorted([IngestOutcome.STORED.value] + [IngestOutcome.DUPLICATE.value] * 7)
        assert len(rows) == 1
    else:
        assert outcomes == sorted([IngestOutcome.STORED.value] + [IngestOutcome.CONFLICT.value] * 7)
        assert len({path for _sha, path in rows}) == 8
    for sha, path in rows:
        assert hashlib.sha256(spool.absolute(path).read_bytes()).hexdigest() == sha
    assert list(spool.staging_dir.iterdir()) == []


@pytest.mark.parametrize("same_bytes", [True, False], ids=["identical", "different"])
def test_two_processes_placing_one_new_uid_keep_each_copy_at_the_path_its_row_names(
    store: QueueStore, spool: Spool, same_bytes: bool,
) -> None:
    """Two processes of one site (PostgreSQL: each with its own locks) store one new SOP Instance UID: the
    first has its file at the UID's name and waits for its fsync, its row not yet committed, when the second
    looks and finds no row. The second's file must not replace the first's (that row would then name bytes
    the file no longer holds, and the first modality's acknowledged bytes would be gone), and the first's
    bytes decide for the second as if it had been committed: identical, a duplicate, no second file left
    behind; different, a conflict, kept beside and flagged."""
    second_store = _Watched(store)
    first, second = IngestService(store, spool), IngestService(second_store, spool)  # two processes' locks
    payloads = [os.urandom(30_000)] * 2 if same_bytes else [os.urandom(30_000), os.urandom(30_000)]
    file1, durable1 = unhashed(spool, payloads[0])
    gate, results = threading.Event(), []

    def held() -> object:
        assert gate.wait(30)  # the first process's fsync still runs
        return durable1()

    worker = threading.Thread(target=lambda: results.append(first.ingest(header("1.2.3.7"), file1, "AE1", durable=held)))
    worker.start()
    plain = spool.absolute(spool.relative_path(header("1.2.3.7"), "", False))
    for _ in range(3000):  # bounded: the first file goes to its name before its fsync ends
        if plain.exists():
            break
        threading.Event().wait(0.01)
    assert plain.exists()
    file2, durable2 = unhashed(spool, payloads[1])
    second_results: list[object] = []
    other = threading.Thread(target=lambda: second_results.append(second.ingest(header("1.2.3.7"), file2, "AE2", durable=durable2)))
    other.start()
    looked = second_store.looked  # the second found the name taken and looks for the first's row again
    assert looked.wait(30)
    gate.set()
    worker.join(60)
    other.join(60)
    outcomes = sorted([results[0].outcome.value, second_results[0].outcome.value])  # type: ignore[attr-defined]
    rows = store.instance_hashes("1.2.3.7")
    assert sorted(sha for sha, _ in rows) == sorted({hashlib.sha256(p).hexdigest() for p in payloads})
    for sha, path in rows:  # every row names the bytes at its path
        assert hashlib.sha256(spool.absolute(path).read_bytes()).hexdigest() == sha
    if same_bytes:
        assert outcomes == sorted([IngestOutcome.STORED.value, IngestOutcome.DUPLICATE.value])
    else:
        assert outcomes == sorted([IngestOutcome.STORED.value, IngestOutcome.CONFLICT.value])
        assert len({path for _, path in rows}) == 2
        flagged = [i.conflict for _u, instances in store.study_units("1.2.3") for i in instances]
        assert sorted(flagged) == [False, True]
    assert plain.read_bytes() == payloads[0]  # the first copy stays where it was put
    on_disk = sorted(p for p in plain.parent.iterdir())
    assert on_disk == sorted(spool.absolute(path) for _, path in rows)  # no file without its row
    assert list(spool.staging_dir.iterdir()) == []


class _Watched:
    """A queue store whose second duplicate lookup is signalled (the taken name's look for another's row)."""

    def __init__(self, store: QueueStore) -> None:
        self._store, self.looked, self._calls = store, threading.Event(), 0

    def instance_hashes(self, sop_instance_uid: str) -> list[tuple[str, str]]:
        self._calls += 1
        if self._calls >= 2:
            self.looked.set()
        return self._store.instance_hashes(sop_instance_uid)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_file_left_at_a_new_uids_name_without_a_row_stays_and_the_instance_is_stored_beside_it(
    store: QueueStore, spool: Spool,
) -> None:
    """A crash between a new UID's rename and its row leaves a file that no row names (its bytes may be
    partial: its fsync never finished). The modality sends the instance again: it is stored and recorded
    under a name with its hash in it, and the leftover is not taken for it nor removed."""
    plain = spool.absolute(spool.relative_path(header("1.2.3.6"), "", False))
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"half an instan")
    left = time.time() - 60  # the crash was a minute ago: no ingest of another process is in flight
    os.utime(plain, (left, left))
    data = os.urandom(20_000)
    file, durable = unhashed(spool, data)
    result = IngestService(store, spool).ingest(header("1.2.3.6"), file, "AE", durable=durable)
    assert result.outcome == IngestOutcome.STORED
    [(sha, path)] = store.instance_hashes("1.2.3.6")
    assert sha == hashlib.sha256(data).hexdigest() and spool.absolute(path).read_bytes() == data
    assert spool.absolute(path) != plain and plain.read_bytes() == b"half an instan"
    assert list(spool.staging_dir.iterdir()) == []


@pytest.mark.parametrize("same_bytes", [True, False], ids=["identical", "different"])
def test_a_uid_recorded_before_whose_file_is_not_at_its_name_is_a_duplicate_or_a_conflict(
    store: QueueStore, spool: Spool, same_bytes: bool,
) -> None:
    """A copy recorded before whose file is gone from the UID's name (retention removed it after delivery)
    still decides, though the name is free: the same bytes again are a duplicate, nothing left at the name
    and one row; different bytes are a conflict, kept and flagged, its row naming the bytes at its path."""
    service = IngestService(store, spool)
    first = os.urandom(20_000)
    file, durable = unhashed(spool, first)
    assert service.ingest(header("1.2.3.5"), file, "AE1", durable=durable).outcome == IngestOutcome.STORED
    [(_sha, first_path)] = store.instance_hashes("1.2.3.5")
    assert spool.remove(first_path)  # what retention does to a delivered study's files
    again = first if same_bytes else os.urandom(20_000)
    file, durable = unhashed(spool, again)
    result = service.ingest(header("1.2.3.5"), file, "AE2", durable=durable)
    plain = spool.absolute(spool.relative_path(header("1.2.3.5"), "", False))
    rows = store.instance_hashes("1.2.3.5")
    if same_bytes:
        assert result.outcome == IngestOutcome.DUPLICATE
        assert len(rows) == 1 and not plain.exists()
    else:
        assert result.outcome == IngestOutcome.CONFLICT
        assert sorted(sha for sha, _ in rows) == sorted(hashlib.sha256(p).hexdigest() for p in (first, again))
        new_path = next(path for sha, path in rows if sha == hashlib.sha256(again).hexdigest())
        assert spool.absolute(new_path).read_bytes() == again
        units = [i for _u, instances in store.study_units("1.2.3") for i in instances if i.sha256 == hashlib.sha256(again).hexdigest()]
        assert [i.conflict for i in units] == [True]
    assert list(spool.staging_dir.iterdir()) == []


def test_a_retry_after_a_failed_row_is_stored_beside_the_file_left_without_waiting_for_its_row(
    store: QueueStore, spool: Spool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database fails at the row (the instance was placed and is durable): the modality hears a refusal
    and sends again at once. The file left at the UID's name is this process's own, no ingest is in flight
    there: the retry does not wait for a row for it (a wait of seconds per instance while a database comes
    back), and is stored under its hashed name; the file left stays where it was."""
    import gateway.service as service_module

    service = IngestService(store, spool)
    data = os.urandom(20_000)
    real_record = store.record_instance
    calls = []

    def failing_once(*args: object, **kwargs: object) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("database is locked")
        return real_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "record_instance", failing_once)
    file, durable = unhashed(spool, data)
    with pytest.raises(OSError, match="database is locked"):
        service.ingest(header("1.2.3.3"), file, "AE", durable=durable)
    plain = spool.absolute(spool.relative_path(header("1.2.3.3"), "", False))
    assert plain.read_bytes() == data  # durable, placed, its row never written
    waits: list[float] = []
    monkeypatch.setattr(service_module.time, "sleep", waits.append)
    file, durable = unhashed(spool, data)
    result = service.ingest(header("1.2.3.3"), file, "AE", durable=durable)
    assert result.outcome == IngestOutcome.STORED and waits == []
    [(sha, path)] = store.instance_hashes("1.2.3.3")
    assert spool.absolute(path) != plain and spool.absolute(path).read_bytes() == data
    assert plain.read_bytes() == data
    assert list(spool.staging_dir.iterdir()) == []
