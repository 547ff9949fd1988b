"""An inbound bundle on real files and a real queue (``adapters.inbox.InboundBundle``): written in pieces
as a stream delivers it, cut and resumed, finished into the spool; the files it opens ahead of the stream
are used, closed and never left behind."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

import adapters.inbox
from adapters.dicom_files import inspect_part10_file
from adapters.inbox import OPEN_AHEAD_FILES, InboundBundle
from adapters.lab.synthetic import generate_ct_study
from adapters.spool import Spool, fsync_and_close
from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleFile, Manifest, file_offsets, stream_bundle
from gateway.service import IngestService
from gateway.store import QueueStore


def _bundle(tmp_path: Path, instances: int) -> tuple[Manifest, list[Path], bytes]:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=instances, rows=128, columns=128)
    files = []
    for path in study.files:
        header = inspect_part10_file(path)
        data = path.read_bytes()
        files.append(BundleFile(header.sop_instance_uid, header.sop_class_uid, header.transfer_syntax_uid, len(data),
                                hashlib.sha256(data).hexdigest()))
    manifest = Manifest(study.study_instance_uid, 1, DEFAULT_CHUNK_BYTES, tuple(files))
    return manifest, study.files, b"".join(stream_bundle(manifest, study.files))


def _descriptors() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def _sink(spool: Spool, store: QueueStore, manifest: Manifest, data: bytes) -> InboundBundle:
    return InboundBundle(spool, IngestService(store, spool), "radiology.hospital-a@example.org",
                         hashlib.sha256(manifest.encode()).hexdigest(), len(data))


def test_a_bundle_cut_and_resumed_is_stored_whole_and_leaves_no_descriptor_or_file_behind(
    tmp_path: Path, spool: Spool, store: QueueStore,
) -> None:
    manifest, paths, data = _bundle(tmp_path, OPEN_AHEAD_FILES * 3)
    before = _descriptors()
    first = _sink(spool, store, manifest, data)
    cut = len(data) // 2 + 12_345
    for start in range(0, cut, 50_000):  # as a stream's reads come, not lined up with the files
        first.write(data[start : min(start + 50_000, cut)])
    first.close("stream cut")
    assert {d for d in _descriptors() - before if str(first.dir) in d} == set()  # the files opened ahead are closed
    second = _sink(spool, store, manifest, data)  # the sender offers the bundle again: it resumes
    assert 0 < second.offset <= cut and second.offset % DEFAULT_CHUNK_BYTES == 0
    for start in range(second.offset, len(data), 70_000):
        second.write(data[start : start + 70_000])
    ok, detail = second.finish()
    assert ok, detail
    assert {d for d in _descriptors() - before if str(second.dir) in d} == set()
    assert not second.dir.exists()  # the inbox folder is gone once everything is in the spool
    stored = {sha: path for entry in manifest.files for sha, path in store.instance_hashes(entry.sop_instance_uid)}
    for entry, path in zip(manifest.files, paths, strict=True):
        assert hashlib.sha256(spool.absolute(stored[entry.sha256]).read_bytes()).hexdigest() == entry.sha256
        assert spool.absolute(stored[entry.sha256]).read_bytes() == path.read_bytes()


def test_a_cut_on_a_slow_disk_waits_for_the_files_being_fsynced_and_leaves_no_descriptor(
    tmp_path: Path, spool: Spool, store: QueueStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole file's fsync and close run on the spool's threads; a cut that came while one was still running
    returned with that file open (seen once in CI at the cut above). The close now waits for them."""
    def slow_fsync_and_close(fd: int) -> None:  # a disk whose flush takes a while
        time.sleep(0.2)
        fsync_and_close(fd)

    monkeypatch.setattr(adapters.inbox, "fsync_and_close", slow_fsync_and_close)
    manifest, _paths, data = _bundle(tmp_path, OPEN_AHEAD_FILES * 2)
    before = _descriptors()
    sink = _sink(spool, store, manifest, data)
    cut = len(data) // 2
    sink.write(data[:cut])  # several whole files: each one's fsync started on the spool's threads
    sink.close("stream cut")
    assert {d for d in _descriptors() - before if str(sink.dir) in d} == set()
    assert _sink(spool, store, manifest, data).offset > 0  # what came is kept for the resume


def _files_start(manifest: Manifest, data: bytes) -> list[int]:
    """Where each instance file's bytes begin in the bundle (after the magic, length and manifest)."""
    return [start for _entry, start in file_offsets(manifest, len(data) - manifest.total_bytes)]


def test_a_file_changed_on_the_way_is_refused_by_name_and_never_handed_on(
    tmp_path: Path, spool: Spool, store: QueueStore,
) -> None:
    """A file whose SHA-256 is not the manifest's rejects the bundle by that instance's name, is kept in quarantine
    with the rest, and never reaches the early import; the files before it did (each was known good), none after."""
    manifest, _paths, data = _bundle(tmp_path, 6)
    bad = 2
    changed = bytearray(data)
    changed[_files_start(manifest, data)[bad] + manifest.files[bad].size // 2] ^= 0x01
    handed: list[str] = []
    sink = InboundBundle(spool, IngestService(store, spool), "radiology.hospital-a@example.org",
                         hashlib.sha256(manifest.encode()).hexdigest(), len(data),
                         on_file=lambda entry, path: handed.append(entry.sop_instance_uid))
    for start in range(0, len(changed), 40_000):
        sink.write(bytes(changed[start : start + 40_000]))
    ok, detail = sink.finish()
    assert not ok and detail == f"SHA-256 mismatch for instance {manifest.files[bad].sop_instance_uid}"
    assert handed == [e.sop_instance_uid for e in manifest.files[:bad]]
    assert all(store.instance_hashes(e.sop_instance_uid) == [] for e in manifest.files)  # nothing recorded
    kept = list((spool.quarantine_dir).iterdir())
    assert any(p.name.endswith(".reason.txt") and "SHA-256 mismatch" in p.read_text() for p in kept)  # kept, not deleted


def test_a_kept_file_changed_on_disk_before_the_resume_is_refused(tmp_path: Path, spool: Spool, store: QueueStore) -> None:
    """The hash is of what is on disk: a whole file kept from a cut stream and changed before the sender resumes
    (a disk fault, a hand) is found when the bundle resumes, not stored."""
    manifest, _paths, data = _bundle(tmp_path, 6)
    first = _sink(spool, store, manifest, data)
    cut = _files_start(manifest, data)[4] + 3 * DEFAULT_CHUNK_BYTES
    first.write(data[:cut])
    first.close("stream cut")
    kept = first.dir / "00001.dcm"
    raw = bytearray(kept.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    kept.write_bytes(bytes(raw))
    second = _sink(spool, store, manifest, data)
    assert second.offset > _files_start(manifest, data)[2]  # the whole files were kept, not sent again
    second.write(data[second.offset :])
    ok, detail = second.finish()
    assert not ok and detail == f"SHA-256 mismatch for instance {manifest.files[1].sop_instance_uid}"
