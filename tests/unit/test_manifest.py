"""The bundle format: deterministic bytes, resume from any offset, end-to-end verification."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.manifest import (
    DEFAULT_CHUNK_BYTES,
    BundleError,
    BundleFile,
    Manifest,
    read_manifest,
    resume_offset,
    stream_bundle,
    verify_bundle,
)


def make_files(tmp_path: Path, sizes: list[int]) -> tuple[Manifest, list[Path]]:
    paths, entries = [], []
    for i, size in enumerate(sizes):
        data = bytes((i * 7 + j) % 251 for j in range(size))
        path = tmp_path / f"f{i}.dcm"
        path.write_bytes(data)
        paths.append(path)
        entries.append(BundleFile(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", size, hashlib.sha256(data).hexdigest()))
    return Manifest("1.2.3", 1, DEFAULT_CHUNK_BYTES, tuple(entries)), paths


def test_bundle_bytes_are_identical_on_every_build(tmp_path: Path) -> None:
    manifest, paths = make_files(tmp_path, [1000, 70000, 5])
    first = b"".join(stream_bundle(manifest, paths))
    again = b"".join(stream_bundle(Manifest.decode(manifest.encode()), paths, read_bytes=4096))
    assert first == again and len(first) == manifest.bundle_bytes


@pytest.mark.parametrize("offset", [0, 1, 12, 500, 1100, 65536, 71000])
def test_streaming_from_an_offset_is_the_tail_of_the_whole(tmp_path: Path, offset: int) -> None:
    manifest, paths = make_files(tmp_path, [1000, 70000, 5])
    whole = b"".join(stream_bundle(manifest, paths))
    assert b"".join(stream_bundle(manifest, paths, offset)) == whole[offset:]


def test_verify_accepts_the_bundle_and_names_a_corrupted_instance(tmp_path: Path) -> None:
    manifest, paths = make_files(tmp_path, [1000, 70000])
    bundle = tmp_path / "b.dgwb"
    bundle.write_bytes(b"".join(stream_bundle(manifest, paths)))
    assert verify_bundle(bundle, manifest.bundle_bytes) == manifest
    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0xFF
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 mismatch for instance 1.2.3.1"):
        verify_bundle(bundle)
    bundle.write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match="manifest accounts for"):
        verify_bundle(bundle)


def test_bad_headers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"NOTABUNDLE......")
    with pytest.raises(BundleError, match="bad magic"), path.open("rb") as fh:
        read_manifest(fh)
    with pytest.raises(BundleError, match="manifest is not valid"):
        Manifest.decode(b"{not json")


def test_resume_offset_is_whole_chunks() -> None:
    assert resume_offset(0, 65536) == 0
    assert resume_offset(65535, 65536) == 0
    assert resume_offset(200000, 65536) == 196608


def test_the_spool_check_names_the_first_changed_file_in_manifest_order_whatever_thread_finds_one(tmp_path: Path) -> None:
    from gateway.dispatch import check_spool

    manifest, paths = make_files(tmp_path, [3_000_000, 1000, 70000, 5, 2_000_000, 64])
    assert check_spool(manifest, paths) is None
    paths[4].write_bytes(paths[4].read_bytes()[:-1] + b"\x00")  # a late, large file changed ...
    paths[3].unlink()  # ... and an earlier, small one gone: the earlier is what the operator is told
    assert check_spool(manifest, paths).startswith("spool file of instance 1.2.3.3 cannot be read: ")
    paths[3].write_bytes(b"12345")  # same size, other bytes
    assert check_spool(manifest, paths).startswith("spool file of instance 1.2.3.3 changed since ingest (5 bytes, SHA-256 ")
    paths[3].write_bytes(bytes((3 * 7 + j) % 251 for j in range(5)))
    assert check_spool(manifest, paths).startswith("spool file of instance 1.2.3.4 changed since ingest (2000000 bytes")
    assert check_spool(Manifest("1.2.3", 1, DEFAULT_CHUNK_BYTES, manifest.files[:1]), paths[:1]) is None  # one file


def test_the_spool_check_reads_no_file_untouched_since_its_row_and_hashes_every_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first attempt: a file whose inode has not changed since its row was written (ctime older than the row,
    same size) is not read; a file written, renamed, touched or chmodded since is hashed, and a changed one is
    named. A retry (no row times) hashes every file: a disk's silent error changes no ctime."""
    from gateway.dispatch import check_spool

    manifest, paths = make_files(tmp_path, [70000, 1000, 5, 64])
    rows_written = [datetime.now(UTC).replace(tzinfo=None)] * len(paths)  # after the files, as at ingest
    hashed: list[str] = []
    real_digest = hashlib.file_digest

    def counting(fh, name):  # type: ignore[no-untyped-def]
        hashed.append(Path(fh.name).name)
        return real_digest(fh, name)

    monkeypatch.setattr("gateway.dispatch.hashlib.file_digest", counting)
    assert check_spool(manifest, paths, rows_written) is None and hashed == []
    assert check_spool(manifest, paths) is None and sorted(hashed) == sorted(p.name for p in paths)  # a retry
    earlier = [at - timedelta(seconds=5) for at in rows_written]  # the rows, as if written 5 s before now
    hashed.clear()
    os.chmod(paths[0], 0o600)  # metadata only: hashed, found intact
    paths[2].write_bytes(b"54321")  # same size, other bytes
    assert check_spool(manifest, paths, earlier).startswith("spool file of instance 1.2.3.2 changed since ingest (5 bytes")
    # Each was changed (or written) after its row: none is taken unread. The check stops at the first
    # difference in the manifest's order, so the last file's hash may be cancelled before it starts (a busy
    # machine); every file up to the difference was hashed.
    assert {p.name for p in paths[:3]} <= set(hashed) <= {p.name for p in paths}
    hashed.clear()
    paths[3].write_bytes(b"x" * 63)  # a different size is read at once, whatever the times
    assert check_spool(Manifest("1.2.3", 1, DEFAULT_CHUNK_BYTES, manifest.files[3:]), paths[3:], rows_written[3:]).startswith(
        "spool file of instance 1.2.3.3 changed since ingest (63 bytes")
    assert hashed == [paths[3].name]


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "dangling symlink", "non-UTF-8 name"])
def test_a_spool_file_replaced_by_something_else_is_named_and_never_waited_for(tmp_path: Path, kind: str) -> None:
    """Whatever stands at a spool path instead of the file (a FIFO no one writes to, a directory, an endless
    device, a link to nothing), the check answers at once with the instance's UID; it does not block."""
    from gateway.dispatch import check_spool

    manifest, paths = make_files(tmp_path, [1000, 2000])
    target = paths[1]
    if kind == "non-UTF-8 name":
        target = tmp_path / os.fsdecode(b"f\xff\x01.dcm")
        paths[1].rename(target)
        paths[1] = target
        assert check_spool(manifest, paths) is None  # a name is only a name
        target.write_bytes(b"x" * 2000)
        assert check_spool(manifest, paths).startswith("spool file of instance 1.2.3.1 changed since ingest")
        return
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device":
        target.symlink_to("/dev/zero")
    else:
        target.symlink_to(tmp_path / "gone")
    for recorded in (None, [datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)] * 2):  # a retry, a first offer
        assert check_spool(manifest, paths, recorded).startswith("spool file of instance 1.2.3.1 cannot be read: ")
