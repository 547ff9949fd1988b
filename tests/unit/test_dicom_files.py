"""Part-10 validation on pydicom's corpus of real files: accepted as they are, refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.dicom_files import (
    RejectedFile,
    header_from_part10_bytes,
    inspect_part10_file,
)
from tests.helpers import PYDICOM_FILES


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
             "MR_small_implicit.dcm", "rtplan.dcm", "test-SR.dcm", "SC_rgb_jpeg_gdcm.dcm"],
)
def test_complete_files_are_accepted(name: str) -> None:
    header = inspect_part10_file(PYDICOM_FILES / name)
    assert header.sop_instance_uid and header.study_instance_uid and header.transfer_syntax_uid


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "truncated: element (7FE0,0010) declares 8192 bytes but only 8130 remain"),
        ("rtplan_truncated.dcm", "truncated: element (300A,00B0)"),
        ("no_meta.dcm", "no 'DICM' prefix"),
        ("meta_missing_tsyntax.dcm", "no Transfer Syntax UID"),
        ("JPEGLSNearLossless_08.dcm", "missing required attribute(s): StudyInstanceUID, SeriesInstanceUID"),
    ],
)
def test_bad_files_are_refused_with_a_reason(name: str, reason: str) -> None:
    with pytest.raises(RejectedFile) as excinfo:
        inspect_part10_file(PYDICOM_FILES / name)
    assert reason in str(excinfo.value)


@pytest.mark.parametrize("cut", [1, 100, 20000, 39000])
def test_any_truncation_is_detected(tmp_path: Path, cut: int) -> None:
    raw = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[: len(raw) - cut])
    with pytest.raises(RejectedFile, match="truncated"):
        inspect_part10_file(path)


def test_truncated_deflate_stream_is_detected(tmp_path: Path) -> None:
    raw = (PYDICOM_FILES / "image_dfl.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[:-200])
    with pytest.raises(RejectedFile, match="deflate"):
        inspect_part10_file(path)


def test_header_from_network_buffer() -> None:
    header = header_from_part10_bytes((PYDICOM_FILES / "CT_small.dcm").read_bytes())
    assert header.modality == "CT" and header.series_number is not None
