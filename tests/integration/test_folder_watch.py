"""The watched folder with real files, real watchdog events and a real SQLite queue."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import Gateway, GatewayController
from gateway.settings import WatchSettings
from tests.helpers import PYDICOM_FILES, dataset_bytes, free_port, wait_for
from tests.integration.test_scp import make_settings

SETTLE_S = 1.0


def start_gateway(tmp_path: Path) -> GatewayController:
    settings = make_settings(tmp_path, free_port())
    settings = replace(
        settings,
        paths=replace(settings.paths, watch_dir=tmp_path / "incoming"),
        watch=WatchSettings(settle_s=SETTLE_S, scan_interval_s=0.1),
    )
    return GatewayController(settings)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    controller = start_gateway(tmp_path)
    gw = controller.start()
    try:
        yield gw
    finally:
        controller.stop()


def quarantined(gw: Gateway) -> dict[str, str]:
    """Quarantined file name (without the time stamp) -> its reason text."""
    return {
        reason.name.split("-", 1)[1].removesuffix(".reason.txt"): reason.read_text()
        for reason in gw.spool.quarantine_dir.glob("*.reason.txt")
    }


def test_files_present_at_start_up_are_ingested(tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=5, rows=32, columns=32)
    incoming = tmp_path / "incoming" / "ct01"
    incoming.mkdir(parents=True)
    for path in study.files:
        shutil.copy(path, incoming / path.name)
    controller = start_gateway(tmp_path)
    gw = controller.start()
    try:
        wait_for(lambda: gw.store.count_instances() == 5, 20, what="5 instances from the watched folder")
        wait_for(lambda: not any(incoming.iterdir()), 10, what="the watched folder to be emptied")
        units = gw.store.study_units(study.study_instance_uid)
        stored = {i.sop_instance_uid: i for _s, rows in units for i in rows}
        assert set(stored) == set(study.sop_instance_uids)
        for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
            assert gw.spool.absolute(stored[uid].spool_path).read_bytes() == path.read_bytes()
            assert stored[uid].source == f"folder:ct01/{path.name}"
    finally:
        controller.stop()


def test_slowly_copied_file_is_taken_only_when_complete(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=1, rows=256, columns=256)
    data = study.files[0].read_bytes()
    target = gateway.watcher.watch_dir / "slow.dcm"
    chunk = len(data) // 6
    pause = threading.Event()
    with target.open("wb") as fh:
        for offset in range(0, len(data), chunk):
            fh.write(data[offset : offset + chunk])
            fh.flush()
            pause.wait(SETTLE_S * 0.5)  # a slow writer: shorter pauses than the settle time
            assert gateway.store.count_instances() == 0
            assert quarantined(gateway) == {}
    wait_for(lambda: gateway.store.count_instances() == 1, 20, what="the slow file to be ingested")
    (unit,) = gateway.store.study_units(study.study_instance_uid)
    assert gateway.spool.absolute(unit[1][0].spool_path).read_bytes() == data
    assert quarantined(gateway) == {}


def test_junk_lands_in_quarantine_with_a_reason_and_an_audit_row(gateway: Gateway, tmp_path: Path) -> None:
    watch = gateway.watcher.watch_dir
    (watch / "notes.txt").write_text("not an image")
    truncated = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    (watch / "truncated.dcm").write_bytes(truncated[: len(truncated) // 2])
    shutil.copy(PYDICOM_FILES / "no_meta.dcm", watch / "no_meta.dcm")
    shutil.copy(PYDICOM_FILES / "JPEGLSNearLossless_08.dcm", watch / "no_study_uid.dcm")
    wait_for(lambda: len(quarantined(gateway)) == 4, 20, what="4 quarantined files")
    reasons = quarantined(gateway)
    assert "not a DICOM Part-10 file: only 12 bytes" in reasons["notes.txt"]
    assert "truncated: element (7FE0,0010)" in reasons["truncated.dcm"]
    assert "no 'DICM' prefix" in reasons["no_meta.dcm"]
    assert "missing required attribute(s): StudyInstanceUID, SeriesInstanceUID" in reasons["no_study_uid.dcm"]
    kept = {p.name.split("-", 1)[1]: p for p in gateway.spool.quarantine_dir.iterdir() if not p.name.endswith(".txt")}
    assert kept["truncated.dcm"].read_bytes() == truncated[: len(truncated) // 2]  # nothing lost
    assert gateway.store.count_instances() == 0
    wait_for(
        lambda: sum(a["event"] == "quarantined" for a in gateway.store.audit_entries()) == 4,
        10,
        what="4 audit rows",
    )


def test_valid_compressed_file_from_folder_keeps_its_bytes(gateway: Gateway) -> None:
    source = PYDICOM_FILES / "MR_small_RLE.dcm"
    shutil.copy(source, gateway.watcher.watch_dir / "rle.dcm")
    wait_for(lambda: gateway.store.count_instances() == 1, 20, what="the RLE file")
    (summary,) = gateway.store.studies()
    ((_unit, (inst,)),) = gateway.store.study_units(summary.study_instance_uid)
    assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.5"
    assert dataset_bytes(gateway.spool.absolute(inst.spool_path)) == dataset_bytes(source)


def test_file_names_that_are_not_utf8_do_not_stop_the_watcher(gateway: Gateway, tmp_path: Path) -> None:
    """A name with bytes that are not UTF-8: a non-DICOM one is quarantined with the name escaped in its reason
    and audit row; a DICOM one is ingested; later files are still taken; the watcher stays alive."""
    import os

    incoming = os.fsencode(gateway.settings.paths.watch_dir)
    with open(incoming + b"/bad\xff\xfename.dcm", "wb") as fh:
        fh.write(b"not dicom at all")
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=16, columns=16)
    shutil.copy(study.files[0], os.fsdecode(incoming + b"/ct\xe9\xff.dcm"))
    wait_for(lambda: any(e["event"] == "quarantined" for e in gateway.store.audit_entries()), 20, 0.1,
             what="the non-DICOM file quarantined")
    (reason,) = quarantined(gateway).values()
    assert "bad\\xff\\xfename.dcm" in reason
    assert any("bad\\xff\\xfename.dcm" in e["detail"] for e in gateway.store.audit_entries() if e["event"] == "quarantined")
    wait_for(lambda: gateway.store.count_instances() == 1, 20, 0.1, what="the DICOM file with the odd name ingested")
    shutil.copy(study.files[1], gateway.settings.paths.watch_dir / "later.dcm")
    wait_for(lambda: gateway.store.count_instances() == 2, 20, 0.1, what="a later file to be ingested")
    assert gateway.watcher is not None and gateway.watcher.alive and gateway.watcher.last_error is None
