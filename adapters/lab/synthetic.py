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
    phantom: bool = False,
) -> GeneratedStudy:
    """Random pixels by default (nothing for a compressor to find); ``phantom``: slices that look like a
    scanner's (see :func:`phantom_slice`; needs numpy, a test dependency)."""
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
            if phantom:
                position = (slice_index - 0.5) / slices_per_series * 2 - 1 + (series_index - 1) * 0.01
                ds.PixelData = phantom_slice(rows, columns, position, seed * 100003 + series_index * 1009 + slice_index)
                ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            else:
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


#: Shepp-Logan head phantom ellipses (Shepp & Logan 1974): centre x, y; half axes a, b; angle (degrees);
#: attenuation change, scaled here to Hounsfield units (skull +1000 over air, brain ~ +40).
_SHEPP_LOGAN = (
    (0.0, 0.0, 0.69, 0.92, 0.0, 2000.0),
    (0.0, -0.0184, 0.6624, 0.874, 0.0, -960.0),
    (0.22, 0.0, 0.11, 0.31, -18.0, -20.0),
    (-0.22, 0.0, 0.16, 0.41, 18.0, -20.0),
    (0.0, 0.35, 0.21, 0.25, 0.0, 10.0),
    (0.0, 0.1, 0.046, 0.046, 0.0, 10.0),
    (0.0, -0.1, 0.046, 0.046, 0.0, 10.0),
    (-0.08, -0.605, 0.046, 0.023, 0.0, 10.0),
    (0.0, -0.605, 0.023, 0.023, 0.0, 10.0),
    (0.06, -0.605, 0.023, 0.046, 0.0, 10.0),
)


def phantom_slice(rows: int, columns: int, position: float, seed: int, noise_hu: float = 10.0) -> bytes:
    """One axial slice of a Shepp-Logan head in Hounsfield units at ``position`` (-1..1 along the head: the
    ellipses shrink towards the ends), air (-1000 HU) around it, Gaussian noise of ``noise_hu``, stored as
    CT does: unsigned 16-bit with a rescale intercept of -1024. Every slice differs (noise, position)."""
    import numpy as np

    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : columns * 1j]
    image = np.full((rows, columns), -1000.0)
    scale = float(np.sqrt(max(0.05, 1.0 - position * position)))
    for x0, y0, a, b, degrees, value in _SHEPP_LOGAN:
        phi = np.radians(degrees)
        xr = (x - x0 * scale) * np.cos(phi) + (y - y0 * scale) * np.sin(phi)
        yr = -(x - x0 * scale) * np.sin(phi) + (y - y0 * scale) * np.cos(phi)
        image[(xr / (a * scale)) ** 2 + (yr / (b * scale)) ** 2 <= 1.0] += value
    image += np.random.default_rng(seed).normal(0.0, noise_hu, image.shape)
    return (image + 1024).clip(0, 4095).astype("<u2").tobytes()
