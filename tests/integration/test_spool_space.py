"""A receiving gateway whose spool cannot take an offered study and keep its reserve for the site's own
modalities (a real small file system: tmpfs): it refuses the offer busy, its modalities go on storing, and the
study crosses once there is room."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.dicom_files import inspect_part10_file
from adapters.inbox import InboundBundle
from adapters.lab.synthetic import generate_ct_study
from adapters.spool import Spool
from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleFile, Manifest, stream_bundle
from gateway.service import IngestService
from gateway.settings import PathSettings
from gateway.store import QueueStore
from tests.helpers import small_file_system, storescu, wait_for
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    PROXY65_VARIANT,
    assert_received_whole,
    running_prosody,
    situation,
    start_site,
    unit_states,
)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, grown later by a remount."""
    with small_file_system(tmp_path / "smallfs", "4m") as mount_point:
        yield mount_point


def test_an_offer_that_would_eat_the_reserve_is_refused_busy_and_the_modalities_keep_storing(
        tmp_path: Path, small_fs: Path) -> None:
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT]) as prosody:
        paths = PathSettings(spool_dir=small_fs / "spool", watch_dir=None, quarantine_dir=tmp_path / "b" / "quarantine",
                             spool_reserve_mb=1)
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), settings_extra={"paths": paths})
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination=B_JID)
        try:
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=8, rows=512, columns=512)  # 4.2 MB
            assert storescu(a.gateway.scp.port, study.files).returncode == 0

            def a_waits_for_room() -> str:
                units = a.gateway.store.studies()
                waiting = [u.state for u in units] == ["waiting-peer"] and "not enough spool space" in (units[0].error or "")
                return (units[0].error or "") if waiting else ""

            error = wait_for(a_waits_for_room, 60, 0.05, what=lambda: f"A to wait for room at B ({situation(a, b)})")
            assert "MB kept for this site's modalities" in error, error
            assert a.gateway.store.count_instances() == len(study.files)  # nothing lost at A
            refused = [e for e in b.gateway.store.audit_entries(limit=5000) if e["event"] == "offer_refused"]
            assert refused and "not enough spool space" in refused[0]["detail"], refused
            assert [t for t in b.gateway.store.transfers() if t["direction"] == "in"] == []  # no stream began

            # B's own modality is not blocked by the peer's study: its instances are stored.
            local = generate_ct_study(tmp_path / "local", series=1, slices_per_series=3, rows=64, columns=64, seed=7)
            result = storescu(b.gateway.scp.port, local.files)
            assert result.returncode == 0 and "(Success)" in result.stdout + result.stderr
            assert b.gateway.store.count_instances() == len(local.files)

            # Room made (the file system grown): A's next offer is taken and the study crosses whole.
            subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)
            wait_for(lambda: unit_states(a.gateway) == ["sent"], 120, 0.2, what=f"A's study to be sent ({situation(a, b)})")
            assert_received_whole(b.gateway, study)
        finally:
            a.stop()
            b.stop()


def test_a_spool_below_its_reserve_says_busy_in_presence_and_its_peers_wait_without_offering(
        tmp_path: Path, small_fs: Path) -> None:
    """No peer's study fits while the spool's free space is below the reserve: B's presence says so (``dnd``),
    A waits by presence (its queue says why) and offers nothing, then sends once B shows room again."""
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT]) as prosody:
        paths = PathSettings(spool_dir=small_fs / "spool", watch_dir=None, quarantine_dir=tmp_path / "b" / "quarantine",
                             spool_reserve_mb=8)  # more than the 4 MiB file system holds
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), settings_extra={"paths": paths})
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination=B_JID)
        try:
            said = "busy (spool space below the reserve kept for this site's modalities)"
            wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == said, 60, 0.05,
                     what=lambda: f"A to see B's spool low ({a.gateway.agent.peer_availability(B_JID)})")
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=256, columns=256)
            assert storescu(a.gateway.scp.port, study.files).returncode == 0

            def a_waits() -> bool:
                units = a.gateway.store.studies()
                return [u.state for u in units] == ["waiting-peer"] and units[0].error == f"peer {said}"

            wait_for(a_waits, 60, 0.05, what=lambda: f"A to wait for B by presence ({situation(a, b)})")
            assert a.gateway.store.transfers() == []  # not offered
            assert [e for e in b.gateway.store.audit_entries(limit=5000) if e["event"] == "offer_refused"] == []

            subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)
            wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == "available", 60, 0.05,
                     what="A to see B ready again")
            wait_for(lambda: unit_states(a.gateway) == ["sent"], 120, 0.2, what=f"A's study to be sent ({situation(a, b)})")
            assert_received_whole(b.gateway, study)
        finally:
            a.stop()
            b.stop()


def _on_disk(bundle: InboundBundle) -> int:
    return sum(path.stat().st_size for path in bundle.dir.iterdir() if path.name == "head" or path.suffix == ".dcm")


def test_a_bundle_that_meets_a_full_disk_counts_only_what_landed_and_resumes_there(
        tmp_path: Path, small_fs: Path, store: QueueStore) -> None:
    """Blocks that keep coming after the disk filled (IBB has several in flight) are refused, not counted: the
    offset the sender resumes at is what the files hold, and the bundle is stored whole once there is room."""
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=12, rows=512, columns=512)  # 6.3 MB
    entries = []
    for path in study.files:
        header, data = inspect_part10_file(path), path.read_bytes()
        entries.append(BundleFile(header.sop_instance_uid, header.sop_class_uid, header.transfer_syntax_uid, len(data),
                                  hashlib.sha256(data).hexdigest()))
    manifest = Manifest(study.study_instance_uid, 1, DEFAULT_CHUNK_BYTES, tuple(entries))
    data = b"".join(stream_bundle(manifest, study.files))
    spool = Spool(small_fs / "spool", tmp_path / "quarantine")
    try:
        def sink() -> InboundBundle:
            return InboundBundle(spool, IngestService(store, spool), "radiology.hospital-a@example.org",
                                 hashlib.sha256(manifest.encode()).hexdigest(), len(data))

        first = sink()
        failed, start = 0, 0
        while start < len(data):
            try:
                first.write(data[start : start + 65_000])
            except OSError:
                failed += 1  # the disk is full, and every later block of this stream is refused too
            start += 65_000
        assert failed > 1
        assert 0 < first.offset < len(data)
        assert first.offset == _on_disk(first)  # nothing counted that is not in the files
        first.close("stream cut: the spool is full")
        subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)
        second = sink()  # the sender offers it again: it resumes at what was kept (whole chunks)
        assert 0 < second.offset <= first.offset
        for start in range(second.offset, len(data), 70_000):
            second.write(data[start : start + 70_000])
        ok, detail = second.finish()
        assert ok, detail
        for entry, path in zip(manifest.files, study.files, strict=True):
            ((sha256, stored),) = store.instance_hashes(entry.sop_instance_uid)
            assert sha256 == entry.sha256 and spool.absolute(stored).read_bytes() == path.read_bytes()
    finally:
        spool.stop()


def test_a_rejected_bundle_folder_goes_to_a_quarantine_on_another_file_system(tmp_path: Path, small_fs: Path) -> None:
    """``[paths] quarantine_dir`` on another file system than the spool: a folder (a rejected inbound bundle) is
    copied there whole, then removed from the spool (a rename cannot cross file systems)."""
    spool = Spool(tmp_path / "spool", small_fs / "quarantine")
    bundle = spool.root / "inbox" / ("ab" * 32)
    bundle.mkdir(parents=True)
    (bundle / "head").write_bytes(b"DICOMGW1" + b"\0" * 100)
    (bundle / "00000.dcm").write_bytes(b"x" * 300_000)
    try:
        kept = spool.quarantine(bundle, "bundle from radiology.hospital-a@example.org rejected: SHA-256 mismatch")
    finally:
        spool.stop()
    assert kept.parent == small_fs / "quarantine" and not bundle.exists()
    assert (kept / "head").read_bytes() == b"DICOMGW1" + b"\0" * 100 and (kept / "00000.dcm").read_bytes() == b"x" * 300_000
    assert "SHA-256 mismatch" in kept.with_name(kept.name + ".reason.txt").read_text()
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name, kept.name + ".reason.txt"]


@pytest.mark.parametrize("methods", [("s5b", "ibb"), ("ibb",)])
def test_a_spool_that_fills_during_a_stream_is_said_to_the_sender_and_the_study_resumes_once_there_is_room(
        tmp_path: Path, small_fs: Path, methods: tuple[str, ...]) -> None:
    """The admission saw room, then the disk filled (another process, here: B's free space as the policy sees it
    is made to say plenty): each stream ends at the bytes that landed with "the receiver's spool is full" in the
    sender's attempt (S5B: no fall back to IBB, which would meet the same disk; IBB: the block refused
    ``resource-constraint``), B keeps what came, and once the file system grows the study resumes and arrives whole."""
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT]) as prosody:
        paths = PathSettings(spool_dir=small_fs / "spool", watch_dir=None, quarantine_dir=tmp_path / "b" / "quarantine",
                             spool_reserve_mb=0)
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), settings_extra={"paths": paths})
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination=B_JID, methods=methods)
        try:
            assert b.gateway.inbound_policy is not None
            b.gateway.inbound_policy.free_bytes = lambda: 10**12  # the admission's view: stale
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=12, rows=512, columns=512)  # 6.3 MB
            assert storescu(a.gateway.scp.port, study.files).returncode == 0

            def said_full() -> list[str]:
                return [t["error"] for t in a.gateway.store.transfers() if "spool is full" in (t["error"] or "")]

            wait_for(lambda: len(said_full()) >= 2, 120, 0.2, what=f"A's attempts to say B's spool is full ({situation(a, b)})")
            attempts = [t for t in a.gateway.store.transfers() if t["direction"] == "out"]
            assert {t["method"] for t in attempts} == {methods[0]}, attempts  # S5B: no IBB try on the same full disk
            assert all("spool is full" in (t["error"] or "") for t in attempts[:2]), attempts
            # What A's queue shows between its attempts (each new attempt clears it while it runs).
            wait_for(lambda: "spool is full" in (a.gateway.store.studies()[0].error or ""), 60, 0.05,
                     what=lambda: f"A's queue to say B's spool is full ({situation(a, b)})")
            assert a.gateway.store.count_instances() == len(study.files)  # nothing lost at A
            assert a.gateway.store.studies()[0].attempts == 0  # B's full disk is B's condition: not counted to dead
            subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)
            wait_for(lambda: unit_states(a.gateway) == ["sent"], 120, 0.2, what=f"A's study to be sent ({situation(a, b)})")
            assert_received_whole(b.gateway, study)
            resumed = [t for t in b.gateway.store.transfers() if t["direction"] == "in" and t["outcome"] == "received"]
            assert resumed and resumed[-1]["offset_bytes"] > 0, b.gateway.store.transfers()  # it resumed, not from zero
        finally:
            a.stop()
            b.stop()
