"""The Storage/Verification SCP against the real dcmtk tools (storescu, dcmsend, echoscu)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import text

from adapters.dicom_files import inspect_part10_file
from adapters.dicom_scu import echo
from adapters.dicom_store import SPARE_FILES
from adapters.dicom_ul import UI, US, Association, encode_command, read_pdu
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import Gateway, GatewayController
from gateway.settings import (
    DicomSettings,
    PathSettings,
    QueueSettings,
    Settings,
    WatchSettings,
)
from tests.helpers import (
    PYDICOM_FILES,
    dataset_bytes,
    dcmtk_env,
    free_port,
    port_open,
    run_dcmtk,
    small_file_system,
    sop_instance_uid,
    storescu,
    transfer_syntax,
    wait_for,
)

COMPRESSED = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated explicit VR LE
}


def make_settings(tmp_path: Path, port: int, **queue: object) -> Settings:
    return Settings(
        dicom=DicomSettings(ae_title="DICOMGW", port=port, allowed_calling_ae_titles=("STORESCU", "DCMSEND", "ECHOSCU")),
        paths=PathSettings(
            spool_dir=tmp_path / "spool", watch_dir=None, quarantine_dir=tmp_path / "quarantine"
        ),
        queue=replace(QueueSettings(db_url=f"sqlite:///{tmp_path / 'queue.db'}", stable_age_s=3600), **queue),
        watch=WatchSettings(),
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    controller = GatewayController(make_settings(tmp_path, 0))
    gw = controller.start()
    try:
        yield gw
    finally:
        controller.stop()


def stored_instances(gw: Gateway) -> dict[str, dict]:
    study_rows = {}
    for summary in gw.store.studies():
        for _unit, instances in gw.store.study_units(summary.study_instance_uid):
            for inst in instances:
                study_rows[inst.sop_instance_uid] = {"ts": inst.transfer_syntax_uid, "path": gw.spool.absolute(inst.spool_path), "sha256": inst.sha256, "conflict": inst.conflict}
    return study_rows


def test_storescu_ct_study_every_instance_recorded_and_byte_identical(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=2, slices_per_series=150, rows=64, columns=64)
    result = storescu(gateway.scp.port, study.files)
    assert result.returncode == 0, result.stderr
    stored = stored_instances(gateway)
    assert set(stored) == set(study.sop_instance_uids)
    for sent_path, uid in zip(study.files, study.sop_instance_uids, strict=True):
        assert stored[uid]["ts"] == transfer_syntax(sent_path)
        assert dataset_bytes(stored[uid]["path"]) == dataset_bytes(sent_path)
    (summary,) = gateway.store.studies()
    assert (summary.study_instance_uid, summary.instances, summary.state) == (study.study_instance_uid, 300, "received")
    assert {s.modalities for s in gateway.store.studies()} == {"CT"}


def _fresh_uid_copy(name: str, out_dir: Path, study_uid: str) -> Path:
    """A copy of a pydicom test file with new SOP Instance and Study UIDs (several share UIDs upstream)."""
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    target = out_dir / name
    ds.save_as(target, enforce_file_format=True)
    return target


def _dcmsend(port: int, files: list[Path]) -> None:
    result = run_dcmtk(["dcmsend", "-v", "-dn", "-aet", "DCMSEND", "-aec", "DICOMGW", "127.0.0.1", str(port), *map(str, files)])
    assert result.returncode == 0, result.stdout + result.stderr


def _wire_reference(files: list[Path], out_dir: Path) -> dict[str, bytes]:
    """What dcmsend puts on the wire (dcmtk re-encodes some sequences), as dcmtk's storescp +B keeps it."""
    out_dir.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", "+B", "-xf", "/etc/dcmtk/storescp.cfg", "AllDICOM", "-od", str(out_dir), "-aet", "DICOMGW", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 10, what="storescp listening")
        _dcmsend(port, files)
    finally:
        scp.terminate()
        scp.wait(10)
    return {sop_instance_uid(p): dataset_bytes(p) for p in out_dir.iterdir()}


def test_dcmsend_compressed_transfer_syntaxes_stored_as_sent(gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "compressed"
    out.mkdir()
    study_uid = generate_uid()
    files = {name: _fresh_uid_copy(name, out, study_uid) for name in COMPRESSED}
    on_the_wire = _wire_reference(list(files.values()), tmp_path / "storescp")
    _dcmsend(gateway.scp.port, list(files.values()))
    stored = stored_instances(gateway)
    for name, path in files.items():
        uid = sop_instance_uid(path)
        assert stored[uid]["ts"] == COMPRESSED[name], name
        assert dataset_bytes(stored[uid]["path"]) == on_the_wire[uid], name
    # Where dcmtk sends the file's own encoding, the spool holds the sent file's data set byte for byte.
    identical = [n for n, p in files.items() if dataset_bytes(p) == on_the_wire[sop_instance_uid(p)]]
    assert len(identical) >= 3, identical  # JPEG baseline, JPEG lossless and deflate, with dcmtk 3.6.7
    for name in identical:
        assert dataset_bytes(stored[sop_instance_uid(files[name])]["path"]) == dataset_bytes(files[name])


def test_echoscu_succeeds_and_unknown_calling_ae_is_rejected_and_audited(gateway: Gateway) -> None:
    ok = run_dcmtk(["echoscu", "-v", "-aet", "ECHOSCU", "-aec", "DICOMGW", "127.0.0.1", str(gateway.scp.port)])
    assert ok.returncode == 0, ok.stderr
    refused = run_dcmtk(["echoscu", "-v", "-aet", "INTRUDER", "-aec", "DICOMGW", "127.0.0.1", str(gateway.scp.port)])
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    wait_for(
        lambda: any(a["event"] == "association_rejected" and "INTRUDER" in a["detail"] for a in gateway.store.audit_entries()),
        10,
        what="an audit row for the rejected association",
    )


def test_dicomgw_echo_reads_every_rejection_as_one_with_its_reason(gateway: Gateway) -> None:
    # pynetdicom's requestor closes its socket when it reads the A-ASSOCIATE-RJ and may check that socket only
    # after: on a busy machine the rejection then read as "aborted". Repeated: each must be the rejection, with
    # the reason.
    answers = [echo("DICOMGW", "127.0.0.1", gateway.scp.port, calling_ae="STRANGER", timeout_s=30) for _ in range(25)]
    assert [a.detail for a in answers] == [
        f"association rejected by DICOMGW@127.0.0.1:{gateway.scp.port}: Rejected (Permanent), DUL service-user: "
        "Calling AE title not recognised"] * 25
    assert echo("DICOMGW", "127.0.0.1", gateway.scp.port, calling_ae="ECHOSCU").ok


def test_duplicate_identical_is_noop_and_different_bytes_kept_and_flagged(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
    assert storescu(gateway.scp.port, study.files).returncode == 0
    assert storescu(gateway.scp.port, study.files[:1]).returncode == 0  # same bytes again
    assert gateway.store.count_instances() == 2
    changed = pydicom.dcmread(study.files[0])
    changed.SeriesDescription = "CORRECTED"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    assert storescu(gateway.scp.port, [changed_path]).returncode == 0
    copies = [i for _u, rows in gateway.store.study_units(study.study_instance_uid) for i in rows if i.sop_instance_uid == study.sop_instance_uids[0]]
    assert sorted(c.conflict for c in copies) == [False, True]
    assert {dataset_bytes(gateway.spool.absolute(c.spool_path)) for c in copies} == {
        dataset_bytes(study.files[0]),
        dataset_bytes(changed_path),
    }
    (summary,) = gateway.store.studies()
    assert "conflict" in summary.flags
    assert any(a["event"] == "conflict" for a in gateway.store.audit_entries())


def test_db_failure_answers_out_of_resources(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=1, rows=32, columns=32)
    with gateway.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO instances_gone"))
    result = storescu(gateway.scp.port, study.files)
    assert _store_responses(result.stdout + result.stderr) == "I: Received Store Response (Refused: OutOfResources)"
    assert list((gateway.spool.staging_dir).iterdir()) == []


def _store_responses(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "Received Store Response" in line)


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk."""
    with small_file_system(tmp_path / "tinyfs", "2m") as mount_point:
        yield mount_point


def test_full_disk_answers_out_of_resources_and_keeps_nothing_half_written(tmp_path: Path, tiny_spool: Path) -> None:
    settings = make_settings(tmp_path, 0)
    settings = replace(settings, paths=replace(settings.paths, spool_dir=tiny_spool / "spool"))
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=8, rows=512, columns=512)  # 8 x 512 KiB
        result = storescu(gw.scp.port, study.files)
        responses = _store_responses(result.stdout + result.stderr)
        assert "Received Store Response (Refused: OutOfResources)" in responses, result.stdout + result.stderr
        acknowledged = responses.count("(Success)")
        assert 0 < acknowledged < len(study.files)
        assert gw.store.count_instances() == acknowledged
        assert list((tiny_spool / "spool" / ".incoming").iterdir()) == []
        on_disk = sorted(tiny_spool.glob("spool/studies/*/*/*.dcm"))
        assert len(on_disk) == acknowledged
        for path, sent in zip(on_disk, sorted(study.files[:acknowledged], key=lambda p: p.name), strict=False):
            assert path.stat().st_size > 0
        for uid, info in stored_instances(gw).items():
            assert dataset_bytes(info["path"]) == dataset_bytes(study.files[study.sop_instance_uids.index(uid)])
    finally:
        controller.stop()
    shutil.rmtree(tmp_path / "ct", ignore_errors=True)


def _open_for(port: int, path: Path) -> Association:
    """An association from our own UL client proposing the file's SOP class and transfer syntax (context 1)."""
    header = inspect_part10_file(path)
    return Association.open("127.0.0.1", port, "STORESCU", "DICOMGW", [(header.sop_class_uid, (header.transfer_syntax_uid,))], 10)


def _store_command(path: Path, message_id: int) -> bytes:
    """The C-STORE-RQ command set for the file."""
    header = inspect_part10_file(path)
    return encode_command([
        (0x00000002, UI, header.sop_class_uid), (0x00000100, US, 0x0001), (0x00000110, US, message_id),
        (0x00000700, US, 0), (0x00000800, US, 0x0000), (0x00001000, UI, header.sop_instance_uid),
    ])


def _half_sent_store(port: int, path: Path, context_ok: bool = True) -> Association:
    """A requestor (our own UL client) that sends a C-STORE command and half of the data set, then stops."""
    assoc = _open_for(port, path)
    context_id = 1 if context_ok else 3  # 3 was never proposed, let alone accepted
    data = dataset_bytes(path)
    assoc._send_fragments(context_id, 0x01, memoryview(_store_command(path, 1)))
    assoc._send_fragments(context_id, 0x00, memoryview(data)[: len(data) // 2], last=False)
    return assoc


def test_a_modality_that_drops_mid_instance_leaves_nothing_and_the_scp_serves_on(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=256, columns=256)
    assoc = _half_sent_store(gateway.scp.port, study.files[0])
    wait_for(lambda: any(gateway.spool.staging_dir.iterdir()), timeout_s=10, what="the staged file of the half-sent instance")
    assoc.sock.close()  # the modality crashed: no A-ABORT, no rest of the data set
    assert wait_for(lambda: not any(gateway.spool.staging_dir.iterdir()), timeout_s=10)  # the half-written file is gone
    assert stored_instances(gateway) == {}
    result = storescu(gateway.scp.port, study.files)  # its slot was given back: the resend is stored whole
    assert result.returncode == 0, result.stderr
    assert set(stored_instances(gateway)) == set(study.sop_instance_uids)


def _store_one(assoc: Association, path: Path, message_id: int) -> int:
    """One whole C-STORE on an open association; the response's status."""
    assoc.send_message(1, _store_command(path, message_id), dataset_bytes(path))
    _context, response, _data = assoc.receive_message()
    return response.us(0x00000900)


@pytest.mark.parametrize("ending", ["release", "dropped"])
def test_the_files_kept_ready_for_an_associations_next_instances_are_gone_when_it_ends(gateway: Gateway, tmp_path: Path,
                                                                                       ending: str) -> None:
    """After its first instance an association keeps a few empty staged files ready (a file create can cost
    a millisecond of kernel time): they are used by the next instances and removed when it ends, released or
    dropped by a crashed modality; nothing else is left in staging."""
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=5, rows=64, columns=64)
    assoc = _open_for(gateway.scp.port, study.files[0])
    try:
        assert _store_one(assoc, study.files[0], 1) == 0x0000
        wait_for(lambda: len(list(gateway.spool.staging_dir.iterdir())) == SPARE_FILES, timeout_s=10,
                 what=f"{SPARE_FILES} staged files ready")
        assert all(p.stat().st_size == 0 for p in gateway.spool.staging_dir.iterdir())
        for number, path in enumerate(study.files[1:], start=2):
            assert _store_one(assoc, path, number) == 0x0000
        if ending == "release":
            assoc.release()
        else:
            assoc.sock.close()  # the modality crashed: no A-RELEASE, no A-ABORT
    finally:
        assoc.sock.close()
    assert wait_for(lambda: not any(gateway.spool.staging_dir.iterdir()), timeout_s=10)
    assert set(stored_instances(gateway)) == set(study.sop_instance_uids)
    for uid, info in stored_instances(gateway).items():
        assert dataset_bytes(info["path"]) == dataset_bytes(study.files[study.sop_instance_uids.index(uid)])


def test_a_message_on_a_context_that_was_not_accepted_is_aborted(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=1, rows=64, columns=64)
    assoc = _half_sent_store(gateway.scp.port, study.files[0], context_ok=False)
    try:
        pdu_type, _body = read_pdu(assoc.sock)
    finally:
        assoc.sock.close()
    assert pdu_type == 0x07  # A-ABORT (PS3.8 9.3.8), not a hang and not a stored instance
    assert stored_instances(gateway) == {}
    assert not any(gateway.spool.staging_dir.iterdir())


def test_long_and_nul_values_from_a_modality_are_stored_on_both_databases(tmp_path: Path, db_url: str) -> None:
    """dcmtk storescu sends what SQLite stored and PostgreSQL refused for ever with 0xA700: a 65-character Study
    Description, a 400-character Patient Name, a 17-character Accession Number, a NUL in a name. All stored,
    the same on both databases, the file byte for byte as sent; a SOP Instance UID over 64 characters: 0xC000."""
    import pydicom

    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=16, columns=16,
                              study_description="D" * 65, patient_name="P" * 400)
    ds = pydicom.dcmread(study.files[1])
    ds.AccessionNumber = "A" * 17
    ds.PatientID = "ID\x00X"
    ds.save_as(study.files[1])
    bad_uid = pydicom.dcmread(study.files[2])
    bad_uid.SOPInstanceUID = bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2." + "3" * 70
    bad_uid.save_as(study.files[2])
    controller = GatewayController(make_settings(tmp_path / "gw", 0, db_url=db_url))
    gw = controller.start()
    try:
        done = storescu(gw.scp.port, study.files[:2])
        assert done.returncode == 0, done.stderr
        stored = stored_instances(gw)
        assert set(stored) == set(study.sop_instance_uids[:2])
        for path in study.files[:2]:
            assert dataset_bytes(stored[pydicom.dcmread(path).SOPInstanceUID]["path"]) == dataset_bytes(path)
        (summary,) = gw.store.studies()
        assert summary.study_description == "D" * 64 and summary.patient_name == "P" * 324
        refused = run_dcmtk(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1", str(gw.scp.port),
                             str(study.files[2])])
        assert "Received Store Response (Error: CannotUnderstand)" in refused.stdout + refused.stderr
        assert gw.store.count_instances() == 2
    finally:
        controller.stop()


def test_a_stall_of_ours_between_two_instances_never_splits_the_study(tmp_path: Path) -> None:
    """The gateway takes longer than the stable age over one instance (a slow disk, a busy machine): the study
    its association is sending stays one unit, also for another process on the queue, and becomes stable once
    the association is over."""
    import threading
    import time

    from gateway.service import CompletenessService

    stable_age = 0.3
    controller = GatewayController(make_settings(tmp_path, 0, stable_age_s=stable_age, stable_check_interval_s=0.05))
    gw = controller.start()
    try:
        # Two instances, the second stalled: storescu's own pause before it (longer than 0.3 s on a loaded
        # machine) is the modality's, which the stable age rightly ends; no tick runs before our stall begins.
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        ingest, calls, stalled, go = gw.ingest.ingest, [0], threading.Event(), threading.Event()
        ticks: list[float] = []
        tick = gw.completeness.tick

        def slow_second(*args: object, **kwargs: object) -> object:
            calls[0] += 1
            if calls[0] == 2:
                stalled.set()
                go.wait(60)
            return ingest(*args, **kwargs)  # type: ignore[arg-type]

        other = CompletenessService(gw.store, stable_age)  # another process of the site on this queue

        def counted_tick() -> list[int]:
            if not stalled.is_set():
                return []
            moved = tick() + other.tick()
            ticks.append(time.monotonic())
            return moved

        gw.ingest.ingest = slow_second  # type: ignore[method-assign]
        gw.completeness.tick = counted_tick  # type: ignore[method-assign]
        done: list[subprocess.CompletedProcess[str]] = []
        sender = threading.Thread(target=lambda: done.append(storescu(gw.scp.port, study.files)))
        sender.start()
        assert stalled.wait(60)
        since = time.monotonic()
        # Ticks ran after the first instance is older than the stable age: it stays open while we stall.
        wait_for(lambda: sum(1 for t in ticks if t > since + 2 * stable_age) >= 3, 60, 0.05, what="three ticks past the stable age")
        assert [(s.state, s.instances) for s in gw.store.studies()] == [("received", 1)]
        go.set()
        sender.join(60)
        assert done and done[0].returncode == 0
        wait_for(lambda: [s.state for s in gw.store.studies()] == ["stable"], 60, 0.05, what="the study to become stable")
        assert [s.instances for s in gw.store.studies()] == [2]  # one unit, both instances
    finally:
        controller.stop()


def _pynetdicom_association(gw: Gateway, example: Path) -> Any:
    """A modality's association (pynetdicom, held open by the test) for the SOP class of ``example``."""
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(pydicom.dcmread(example).SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="DICOMGW")
    assert assoc.is_established
    return assoc


def test_an_open_but_silent_association_does_not_hold_its_study(tmp_path: Path) -> None:
    """A modality that keeps its association open after its last instance (some keep one for a session): its
    study becomes stable after the stable age all the same."""
    controller = GatewayController(make_settings(tmp_path, 0, stable_age_s=0.3, stable_check_interval_s=0.05))
    gw = controller.start()
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assoc = _pynetdicom_association(gw, study.files[0])
        try:
            for path in study.files:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
            wait_for(lambda: [s.state for s in gw.store.studies()] == ["stable"], 60, 0.05,
                     what="the study to become stable while its association is open")
            assert assoc.is_established and [s.instances for s in gw.store.studies()] == [2]
        finally:
            assoc.release()
    finally:
        controller.stop()


@pytest.mark.parametrize("pause_s", [None, 120.0])
def test_a_modality_pausing_on_its_association_keeps_one_unit_within_the_association_pause(tmp_path: Path,
                                                                                            pause_s: float | None) -> None:
    """``[queue] association_pause_s``: a modality that pauses longer than the stable age between two instances
    on one association (reconstructions sent later) keeps its study in one unit when the pause allows it; by
    default (the stable age) the late instance opens a follow-up unit, as documented."""
    controller = GatewayController(make_settings(tmp_path, 0, stable_age_s=0.3, stable_check_interval_s=0.05,
                                                 association_pause_s=pause_s))
    gw = controller.start()
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assoc = _pynetdicom_association(gw, study.files[0])
        try:
            assert assoc.send_c_store(pydicom.dcmread(study.files[0])).Status == 0x0000
            ticks, paused = _counted_ticks(gw), time.monotonic()
            # The modality's pause: ten of the main loop's ticks, beyond twice the stable age.
            wait_for(lambda: ticks[0] >= 10 and time.monotonic() - paused > 0.6, 60, 0.05, what="ticks past the stable age")
            if pause_s:
                assert [s.state for s in gw.store.studies()] == ["received"]
            else:  # stable one stable age after the pause's end (the hold's last tick stamped it)
                wait_for(lambda: [s.state for s in gw.store.studies()] == ["stable"], 60, 0.05, what="the first unit stable")
            assert assoc.send_c_store(pydicom.dcmread(study.files[1])).Status == 0x0000
        finally:
            assoc.release()
        wait_for(lambda: {s.state for s in gw.store.studies()} == {"stable"}, 60, 0.05, what="the study stable")
        expected = [2] if pause_s else [1, 1]
        assert [s.instances for s in gw.store.studies()] == expected
    finally:
        controller.stop()


def _counted_ticks(gw: Gateway) -> list[int]:
    """Count the main loop's completeness ticks from now on: [count]."""
    ticks = [0]
    tick = gw.completeness.tick

    def counted_tick() -> list[int]:
        ticks[0] += 1
        return tick()

    gw.completeness.tick = counted_tick  # type: ignore[method-assign]
    return ticks


def test_a_study_fed_for_longer_than_the_slack_is_looked_at_once_when_it_may_be_stable(tmp_path: Path) -> None:
    """A study whose instances keep coming is not looked at for each one: the main loop (which reads and
    writes the queue at each tick, beside the ingest) wakes once its last instance is a stable age old.
    The modality here sends for at least 0.4 s, 20 times the slack between two wake-ups for one study."""
    controller = GatewayController(make_settings(tmp_path, 0, stable_age_s=1.0, stable_check_interval_s=30))
    gw = controller.start()
    try:
        ticks = _counted_ticks(gw)
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=200, rows=64, columns=64)
        assoc = _open_for(gw.scp.port, study.files[0])
        started, sent = time.monotonic(), 0
        try:
            for number, path in enumerate(study.files, start=1):  # bounded: 200 instances at most
                assert _store_one(assoc, path, number) == 0x0000
                sent = number
                if time.monotonic() - started >= 0.4 and number >= 10:
                    break
            assoc.release()
        finally:
            assoc.sock.close()
        wait_for(lambda: [s.state for s in gw.store.studies()] == ["stable"], 20, 0.05, what="the study to become stable")
        assert [s.instances for s in gw.store.studies()] == [sent]
        assert ticks[0] <= 2  # was one per 20 ms of feeding: 20 or more here
    finally:
        controller.stop()


def test_a_study_becomes_stable_at_its_stable_age_not_at_the_next_check_interval(tmp_path: Path) -> None:
    """The main loop sleeps ``stable_check_interval_s`` (30 s here) between its ticks, but wakes when a stored
    instance's study may become stable: the study is stable within seconds, with no tick per instance."""
    controller = GatewayController(make_settings(tmp_path, 0, stable_age_s=0.5, stable_check_interval_s=30))
    gw = controller.start()
    try:
        ticks = _counted_ticks(gw)
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=20, rows=32, columns=32)
        assert storescu(gw.scp.port, study.files).returncode == 0
        wait_for(lambda: [s.state for s in gw.store.studies()] == ["stable"], 20, 0.05,
                 what="the study to become stable before the 30 s check interval")
        assert [s.instances for s in gw.store.studies()] == [20]
        assert ticks[0] < 20  # woken for the study, not for each of its instances
    finally:
        controller.stop()
