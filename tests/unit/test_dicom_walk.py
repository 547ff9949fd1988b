"""The streaming data-set walker: property-based (hypothesis) over data sets pydicom writes, in every
uncompressed transfer syntax, with nested sequences of defined and undefined length."""

from __future__ import annotations

import pydicom
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from adapters.dicom_walk import DatasetWalker
from tests.helpers import PYDICOM_FILES, dataset_bytes

SYNTAXES = {"1.2.840.10008.1.2": (True, True), "1.2.840.10008.1.2.1": (False, True), "1.2.840.10008.1.2.2": (False, False)}


def encode(ds: Dataset, syntax: str) -> tuple[bytes, list[int]]:
    """The data set's bytes and the offsets where each top-level element ends."""
    implicit, little = SYNTAXES[syntax]
    ends, out = [], b""
    for elem in ds:
        one = Dataset()
        one.add(elem)
        buffer = pydicom.filebase.DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
        write_dataset(buffer, one)
        out += buffer.getvalue()
        ends.append(len(out))
    return out, ends


texts = st.text(alphabet="ABCDEFGH^ 0123456789", max_size=20)


@st.composite
def datasets(draw: st.DrawFn, depth: int = 0) -> Dataset:
    ds = Dataset()
    ds.PatientName = draw(texts)
    ds.PatientID = draw(texts)
    if draw(st.booleans()):
        ds.StudyDescription = draw(texts)
    if depth < 2 and draw(st.booleans()):
        items = draw(st.lists(datasets(depth + 1), max_size=3))  # type: ignore[call-arg]
        ds.ReferencedSeriesSequence = Sequence(items)
        ds["ReferencedSeriesSequence"].is_undefined_length = draw(st.booleans())
        for item in ds.ReferencedSeriesSequence:
            item.is_undefined_length_sequence_item = draw(st.booleans())
    pixels = draw(st.binary(max_size=64))
    ds.add_new(0x7FE00010, "OB", pixels + b"\0" * (len(pixels) % 2))
    return ds


@settings(max_examples=150, deadline=None)
@given(ds=datasets(), syntax=st.sampled_from(sorted(SYNTAXES)), chunk=st.integers(1, 97), data=st.data())
def test_complete_exactly_at_top_level_element_boundaries(ds: Dataset, syntax: str, chunk: int, data: st.DataObject) -> None:
    encoded, ends = encode(ds, syntax)
    cut = data.draw(st.integers(0, len(encoded)))
    walker = DatasetWalker(syntax)
    for pos in range(0, cut, chunk):
        walker.feed(encoded[pos : min(cut, pos + chunk)])
    assert walker.complete() == (cut in ends or cut == 0), (cut, ends, walker.problem())
    if cut == len(encoded):
        assert walker.offset == len(encoded)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=200), syntax=st.sampled_from(sorted(SYNTAXES)))
def test_arbitrary_bytes_never_raise(junk: bytes, syntax: str) -> None:
    walker = DatasetWalker(syntax)
    walker.feed(junk)
    walker.complete()
    walker.problem()


def test_real_files_walk_whole_and_truncated_ones_do_not() -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "rtplan.dcm", "MR_small_RLE.dcm"):
        path = PYDICOM_FILES / name
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        body = dataset_bytes(path)
        whole = DatasetWalker(syntax)
        whole.feed(body)
        assert whole.complete(), (name, whole.problem())
        cut = DatasetWalker(syntax)
        cut.feed(body[:-3])
        assert not cut.complete() and "short of the end" in cut.problem() or "inside" in cut.problem()
