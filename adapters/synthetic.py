"""Synthetic but realistic CT studies for tests, benchmarks and the demo (no patient data anywhere).

Each instance is a CT Image Storage Part-10 file, Explicit VR Little Endian, 16-bit signed pixels with
the Patient/Study/Series/Image modules filled as a scanner would. Pixel bytes are pseudo-random from a
seed, so a study is reproducible and does not compress to nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1456."  # pydicom's organisational root with a gateway sub-arc


@dataclass(frozen=True)
class GeneratedStudy:
    study_instance_uid: str
    files: list[Path]
    sop_instance_uids: list[str]
    size_bytes: int


def generate_ct_study(
    out_dir: Path,
    series: int = 2,
    slices_per_series: int = 10,
    rows: int = 512,
    columns: int = 512,
    seed: int = 1,
    patient_name: str = "DEMO^PATIENT",
    study_description: str = "CT THORAX",
) -> GeneratedStudy:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    study_uid = generate_uid(UID_ROOT)
    now = datetime.now(UTC)
    files: list[Path] = []
    uids: list[str] = []
    total = 0
    for series_index in range(1, series + 1):
        series_uid = generate_uid(UID_ROOT)
        for slice_index in range(1, slices_per_series + 1):
            sop_uid = generate_uid(UID_ROOT)
            ds = _ct_slice(study_uid, series_uid, sop_uid, series_index, slice_index, rows, columns, now)
            ds.PatientName = patient_name
            ds.StudyDescription = study_description
            ds.PixelData = rng.randbytes(rows * columns * 2)
            path = out_dir / f"s{series_index:02d}_i{slice_index:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            uids.append(sop_uid)
            total += path.stat().st_size
    return GeneratedStudy(study_uid, files, uids, total)


def _ct_slice(
    study_uid: str, series_uid: str, sop_uid: str, series_no: int, slice_no: int, rows: int, columns: int, now: datetime
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC" + study_uid[-8:].replace(".", "")
    ds.Modality = "CT"
    ds.Manufacturer = "dicomgw synthetic"
    ds.PatientID = "DEMO0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_no
    ds.SeriesDescription = f"AXIAL {series_no}"
    ds.InstanceNumber = slice_no
    ds.ImagePositionPatient = [0.0, 0.0, float(slice_no)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    return ds
