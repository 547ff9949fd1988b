"""An instance coerced on its way into the PACS (``gateway.coercion``): attributes set or removed, the originals kept
in the Original Attributes Sequence (0400,0561) with Modifying System, Source of Previous Values and Reason for the
Attribute Modification "COERCE" (PS3.3 C.12.1.1.9). Pixel data is never decoded: its bytes (native or
encapsulated) are written back as read; the rest is encoded in the instance's own transfer syntax. The spool file
is not changed."""

from __future__ import annotations

import copy
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from gateway.coercion import Coercion


def coerce_file(path: Path, coercion: Coercion, modifying_system: str, source: str) -> bytes:
    """The coerced data set (no file meta), in the file's transfer syntax."""
    ds = pydicom.dcmread(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    original = Dataset()
    for keyword, value in coercion.set.items():
        if keyword in ds:
            if str(ds.data_element(keyword).value) == value:
                continue
            original.add(copy.deepcopy(ds.data_element(keyword)))  # setattr changes the element in place
        setattr(ds, keyword, value)
    for keyword in coercion.remove:
        if keyword in ds:
            original.add(copy.deepcopy(ds.data_element(keyword)))
            delattr(ds, keyword)
    item = Dataset()
    item.AttributeModificationDateTime = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = modifying_system[:64]
    item.SourceOfPreviousValues = source[:64]
    item.ReasonForTheAttributeModification = "COERCE"
    item.ModifiedAttributesSequence = [original]
    ds.OriginalAttributesSequence = [*ds.get("OriginalAttributesSequence", []), item]
    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data
