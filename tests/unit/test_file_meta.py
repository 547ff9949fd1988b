"""The File Meta Information the SCP writes before a stored data set (``adapters.dicom_store.file_meta_bytes``)
is byte for byte what pynetdicom's ``encode_file_meta`` (the kept codec) makes of the same values, and
pydicom reads it back to those values."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pynetdicom.dsutils import encode_file_meta

from adapters.dicom_store import PART10_PREFIX, file_meta_bytes
from adapters.dicom_ul import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

uids = st.from_regex(r"\A(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,7}\Z").filter(lambda u: len(u) <= 64)
ae_titles = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
                    min_size=1, max_size=16)


def reference(sop_class: str, sop_instance: str, syntax: str, ae: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = ae
    return encode_file_meta(meta)


@settings(max_examples=300, deadline=None)
@given(uids, uids, st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50",
                                    "1.2.840.10008.1.2.4.201"]), ae_titles)
def test_same_bytes_as_pynetdicom(sop_class: str, sop_instance: str, syntax: str, ae: str) -> None:
    assert file_meta_bytes(sop_class, sop_instance, syntax, ae) == reference(sop_class, sop_instance, syntax, ae)


def test_pydicom_reads_the_values_back() -> None:
    raw = PART10_PREFIX + file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "CT_SCANNER")
    meta = dcmread(io.BytesIO(raw)).file_meta
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.SourceApplicationEntityTitle == "CT_SCANNER"
    assert meta.FileMetaInformationGroupLength == len(raw) - 128 - 4 - 12


def test_odd_and_hostile_values_keep_the_structure() -> None:
    """A value the SCP was given as is (an AE title with a control character, a UID of odd length) is padded
    and written within its element: pydicom still reads every element of the group."""
    raw = PART10_PREFIX + file_meta_bytes("1.2.3", "1.2.345", "1.2.840.10008.1.2", "A\x1bB é")
    meta = dcmread(io.BytesIO(raw)).file_meta
    assert meta.MediaStorageSOPInstanceUID == "1.2.345" and meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert len(raw) % 2 == 0
