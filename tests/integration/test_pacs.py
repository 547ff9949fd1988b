"""The PACS edge against a real Orthanc (started here): C-STORE of whole studies, refusals, conversion."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from adapters.dicom_files import inspect_part10_file
from adapters.lab.localpeers import Orthanc, free_port, orthanc_instances
from adapters.lab.synthetic import generate_ct_study
from adapters.pacs import PacsClient
from gateway.importing import PacsOutcome, PacsRefused, PacsUnavailable, Verdict
from gateway.model import InstanceRecord
from gateway.settings import PacsSettings
from tests.helpers import PYDICOM_FILES, dataset_bytes


def record(path: Path) -> InstanceRecord:
    h = inspect_part10_file(path)
    return InstanceRecord(h.sop_instance_uid, h.sop_class_uid, h.transfer_syntax_uid, h.series_instance_uid, None, "",
                          h.modality, None, path.stat().st_size, "", str(path), False, "test", datetime.now())


def store(orthanc_port: int, paths: list[Path]) -> dict[str, PacsOutcome]:
    client = PacsClient(PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=orthanc_port, timeout_s=10), Path("/"))
    outcomes: dict[str, PacsOutcome] = {}
    client.store([record(p) for p in paths], lambda i, o: outcomes.__setitem__(i.sop_instance_uid, o))
    return outcomes


@pytest.fixture
def orthanc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Orthanc]:
    extra = getattr(request, "param", {})
    with Orthanc(tmp_path / "orthanc", extra=extra) as server:
        server.start()
        yield server


def test_study_is_stored_in_its_own_syntaxes_byte_for_byte(tmp_path: Path, orthanc: Orthanc) -> None:
    study = generate_ct_study(tmp_path / "ct", series=2, slices_per_series=10, rows=128, columns=128)
    extra = [PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm", PYDICOM_FILES / "CT_small.dcm", PYDICOM_FILES / "JPEG2000.dcm"]
    paths = [*study.files, *extra]
    outcomes = store(orthanc.dicom_port, paths)
    assert {o.verdict for o in outcomes.values()} == {Verdict.STORED} and len(outcomes) == len(paths)
    held = orthanc_instances(orthanc)
    for path in paths:
        uid = inspect_part10_file(path).sop_instance_uid
        assert held[uid]["transfer_syntax"] == str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        stored = orthanc.raw(f"/instances/{held[uid]['id']}/file")
        if path in extra:
            # Orthanc (dcmtk) normalises these older files when it writes them (OW -> OB for encapsulated
            # pixel data, undefined -> defined sequence lengths); the compressed pixel data must be untouched.
            assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(stored)).PixelData == pydicom.dcmread(path).PixelData
        else:
            assert dataset_bytes_of_bytes(stored) == dataset_bytes(path)


def dataset_bytes_of_bytes(raw: bytes) -> bytes:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(raw)
        fh.flush()
        return dataset_bytes(Path(fh.name))


@pytest.mark.parametrize("orthanc", [{"DeflatedTransferSyntaxAccepted": False}], indirect=True)
def test_a_refused_syntax_is_converted_and_the_outcome_says_so(tmp_path: Path, orthanc: Orthanc) -> None:
    source = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    source.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    source.save_as(deflated, enforce_file_format=True)
    outcomes = store(orthanc.dicom_port, [deflated])
    (outcome,) = outcomes.values()
    assert outcome.verdict == Verdict.STORED
    assert f"converted {DeflatedExplicitVRLittleEndian} -> {ExplicitVRLittleEndian}" in outcome.detail
    (held,) = orthanc_instances(orthanc).values()
    assert held["transfer_syntax"] == ExplicitVRLittleEndian


@pytest.mark.parametrize("orthanc", [{"RleTransferSyntaxAccepted": False}], indirect=True)
def test_compressed_data_the_pacs_refuses_is_a_permanent_failure_with_the_reason(orthanc: Orthanc) -> None:
    outcomes = store(orthanc.dicom_port, [PYDICOM_FILES / "MR_small_RLE.dcm", PYDICOM_FILES / "CT_small.dcm"])
    rle = outcomes[inspect_part10_file(PYDICOM_FILES / "MR_small_RLE.dcm").sop_instance_uid]
    assert rle.verdict == Verdict.PERMANENT and rle.status is None
    assert "PACS refused 1.2.840.10008.1.2.5 for 1.2.840.10008.5.1.4.1.1.4" in rle.detail and "cannot decompress" in rle.detail
    assert outcomes[inspect_part10_file(PYDICOM_FILES / "CT_small.dcm").sop_instance_uid].verdict == Verdict.STORED
    assert orthanc.instance_count() == 1


def test_an_unknown_sop_class_is_refused_permanently_and_the_rest_is_stored(tmp_path: Path, orthanc: Orthanc) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
    private = tmp_path / "private.dcm"
    ds = pydicom.dcmread(study.files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.9.7433.99.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.99.2.1"
    ds.save_as(private, enforce_file_format=True)
    outcomes = store(orthanc.dicom_port, [*study.files, private])
    refused = outcomes[str(ds.SOPInstanceUID)]
    assert refused.verdict == Verdict.PERMANENT
    assert "refused SOP class 1.2.826.0.1.3680043.9.7433.99.1" in refused.detail and "abstract syntax not supported" in refused.detail
    assert set(orthanc_instances(orthanc)) == set(study.sop_instance_uids)


def test_no_pacs_listening_is_transient(tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=1, rows=32, columns=32)
    with pytest.raises(PacsUnavailable, match="no association with ORTHANC@127.0.0.1"):
        store(free_port(), study.files)


class CountingSCP:
    """A real pynetdicom Storage SCP that records which association stored each instance."""

    def __init__(self, maximum_associations: int) -> None:
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )

        self.port = free_port()
        self.stored: list[tuple[int, str]] = []  # (association id, SOP Instance UID)
        self.accepted = 0
        ae = AE(ae_title="LIMITED")
        ae.maximum_associations = maximum_associations
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)

        both_up = threading.Event()

        def on_store(event: object) -> int:
            if maximum_associations > 1:  # the first store waits for the second association (a busy machine may
                both_up.wait(60)          # otherwise send the whole small study before the second is up)
            self.stored.append((id(event.assoc), str(event.request.AffectedSOPInstanceUID)))  # type: ignore[attr-defined]
            return 0x0000

        def on_accepted(_event: object) -> None:
            self.accepted += 1
            if self.accepted >= 2:
                both_up.set()

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)])


@pytest.mark.parametrize("maximum_associations", [1, 8])
def test_a_study_goes_over_the_associations_the_pacs_accepts_each_instance_once(tmp_path: Path, maximum_associations: int) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=30, rows=64, columns=64)
    scp = CountingSCP(maximum_associations)
    try:
        client = PacsClient(PacsSettings(ae_title="LIMITED", host="127.0.0.1", port=scp.port, timeout_s=10,
                                         associations_per_study=2), Path("/"))
        outcomes: dict[str, PacsOutcome] = {}
        client.store([record(p) for p in study.files], lambda i, o: outcomes.__setitem__(i.sop_instance_uid, o))
    finally:
        scp.server.shutdown()
    uids = [uid for _assoc, uid in scp.stored]
    assert sorted(uids) == sorted(study.sop_instance_uids)  # every instance, none twice
    assert {o.verdict for o in outcomes.values()} == {Verdict.STORED} and len(outcomes) == len(study.files)
    used = {assoc for assoc, _uid in scp.stored}
    # A PACS that takes one association at a time refuses the second (A-ASSOCIATE-RJ): the study still
    # arrives whole over the first. One that takes more gets the study over two.
    assert len(used) == min(2, maximum_associations)


def test_a_pacs_that_does_not_know_our_ae_title_gets_a_hint(tmp_path: Path) -> None:
    """Orthanc that stores only from its DicomModalities refuses our association: the reason says what to fix."""
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=1, rows=16, columns=16)
    strict = {"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowFind": False}
    with Orthanc(tmp_path / "orthanc", extra=strict) as orthanc:
        orthanc.start()
        client = PacsClient(PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port,
                                         calling_ae_title="GWB", timeout_s=10), Path("/"))
        with pytest.raises(PacsRefused) as refused:
            client.store([record(p) for p in study.files], lambda _i, _o: None)
        assert "calling AE title not recognised" in str(refused.value)
        assert "does the PACS know this gateway? It calls itself 'GWB'" in str(refused.value)
        assert "DicomModalities" in str(refused.value) and orthanc.instance_count() == 0
