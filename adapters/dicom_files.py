"""Reading DICOM files and buffers without decoding pixel data (pydicom lives here, not in the core).

- :func:`header_from_part10_bytes` gives the :class:`InstanceHeader` of a Part-10 buffer (File Meta
  Information + data set, as the SCP builds it).
- :func:`inspect_part10_file` checks that a file is a complete Part-10 file (PS3.10 7.1: preamble, ``DICM``,
  File Meta Information with a Transfer Syntax UID) whose data set parses to its last byte and carries SOP
  Class, SOP Instance, Study and Series Instance UIDs. It raises :class:`RejectedFile` with a reason a person
  can act on. The structure walk follows PS3.5 7.1 (element encoding) and 7.5 (sequences, undefined
  lengths) and reads through ``mmap``, so memory stays flat for any file size.
"""

from __future__ import annotations

import io
import mmap
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from gateway.model import InstanceHeader

HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "StudyDescription",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
]
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)


class RejectedFile(ValueError):
    """Not an instance the gateway can accept; ``str()`` is the reason written next to the quarantined file."""


def header_from_part10_bytes(data: bytes) -> InstanceHeader:
    """Header of a Part-10 buffer; raises :class:`RejectedFile` if identifying UIDs are missing."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, zlib.error) as exc:
        raise RejectedFile(f"data set cannot be parsed: {exc}") from exc
    return _header(ds)


#: (group, element) -> InstanceHeader field, for the fast header read; all sit in groups 0008-0020.
FAST_TAGS: dict[int, str] = {
    0x00080005: "charset",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080020: "study_date",
    0x00080050: "accession_number",
    0x00080060: "modality",
    0x00081030: "study_description",
    0x0008103E: "series_description",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00200011: "series_number",
    0x00200013: "instance_number",
}
PN_DELIMITERS = {0x5C, 0x3D, 0x5E}  # backslash, '=', '^' (PS3.5 6.2: PN component groups)


def header_from_dataset_bytes(dataset: bytes, transfer_syntax: str) -> InstanceHeader:
    """Header of an encoded data set (no File Meta Information), as a C-STORE delivers it.

    Little-endian syntaxes (every uncompressed LE and every encapsulated one) are read by walking the
    element headers up to group 0020, skipping sequences, with no decoding of anything else; deflated and
    big-endian data sets go through pydicom. Raises :class:`RejectedFile` when identifying UIDs are missing.
    """
    if transfer_syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        from pydicom.filereader import read_dataset  # local: rarely used
        from pydicom.uid import UID

        uid = UID(transfer_syntax)
        try:
            body = zlib.decompress(dataset, -zlib.MAX_WBITS) if uid == DeflatedExplicitVRLittleEndian else dataset
            ds = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=uid != ExplicitVRBigEndian,
                              stop_when=lambda tag, vr, length: tag.group > 0x0020)
        except (EOFError, ValueError, struct.error, KeyError, zlib.error) as exc:
            raise RejectedFile(f"data set cannot be parsed: {exc}") from exc
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid
        return _header(ds)
    walker = _Walker(dataset, explicit=transfer_syntax != ImplicitVRLittleEndian, little=True)
    try:
        raw = walker.collect(FAST_TAGS, last_group=0x0020)
    except (RejectedFile, struct.error) as exc:
        raise RejectedFile(f"data set cannot be parsed: {exc}") from exc
    encodings = convert_encodings(_text(raw.pop("charset", b"")).split("\\") or None) if "charset" in raw else ["iso8859"]
    values = {k: _text(v) for k, v in raw.items() if k != "patient_name"}
    missing = [k for k in ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid") if not values.get(k)]
    if missing:
        raise RejectedFile("missing required attribute(s): " + ", ".join(missing))
    return _checked(InstanceHeader(
        sop_instance_uid=values["sop_instance_uid"],
        sop_class_uid=values["sop_class_uid"],
        transfer_syntax_uid=transfer_syntax,
        study_instance_uid=values["study_instance_uid"],
        series_instance_uid=values["series_instance_uid"],
        patient_id=_decoded(raw.get("patient_id", b""), encodings, set()),
        patient_name=_decoded(raw.get("patient_name", b""), encodings, PN_DELIMITERS),
        study_description=_decoded(raw.get("study_description", b""), encodings, set()),
        study_date=values.get("study_date", ""),
        accession_number=values.get("accession_number", ""),
        modality=values.get("modality", ""),
        series_description=_decoded(raw.get("series_description", b""), encodings, set()),
        series_number=_int_or_none(values.get("series_number")),
        instance_number=_int_or_none(values.get("instance_number")),
    ))


def header_from_part10_prefix(prefix: bytes, transfer_syntax: str) -> InstanceHeader:
    """Header from the first bytes of a Part-10 file whose integrity is already established (its size and
    SHA-256 matched a manifest): the fast walker on the start of the data set. Raises :class:`RejectedFile`
    when the prefix does not reach the end of group 0020 (the caller then reads the whole file)."""
    offset = dataset_offset(io.BytesIO(prefix), len(prefix))  # type: ignore[arg-type]
    return header_from_dataset_bytes(prefix[offset:], transfer_syntax)


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip(" \x00")


def _decoded(value: bytes, encodings: list[str], delimiters: set[int]) -> str:
    return decode_bytes(value, encodings, delimiters).strip(" \x00") if value else ""


def inspect_part10_file(path: Path) -> InstanceHeader:
    """Validate ``path`` as a complete Part-10 file and return its header."""
    size = path.stat().st_size
    if size < 132:
        raise RejectedFile(f"not a DICOM Part-10 file: only {size} bytes, no 128-byte preamble and 'DICM' prefix")
    with path.open("rb") as fh:
        fh.seek(128)
        if fh.read(4) != b"DICM":
            raise RejectedFile("not a DICOM Part-10 file: no 'DICM' prefix after the 128-byte preamble")
        data_start = dataset_offset(fh, size)
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, zlib.error) as exc:
            if isinstance(exc, zlib.error):
                raise RejectedFile(f"truncated or corrupt deflate stream: {exc}") from exc
            raise RejectedFile(f"DICOM header cannot be parsed: {exc}") from exc
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
        if not transfer_syntax:
            raise RejectedFile("File Meta Information has no Transfer Syntax UID (0002,0010)")
    header = _header(ds)
    _check_complete(path, data_start, str(transfer_syntax))
    return header


def dataset_offset(fh: io.BufferedReader, size: int) -> int:
    """Offset of the first data set element: after the group 0002 elements (explicit VR LE, PS3.10 7.1)."""
    fh.seek(132)
    while True:
        start = fh.tell()
        head = fh.read(8)
        if len(head) < 8:
            raise RejectedFile("truncated: file ends inside the File Meta Information")
        group = struct.unpack_from("<H", head)[0]
        if group != 0x0002:
            return start
        vr = head[4:6]
        if vr in LONG_VRS:
            length = struct.unpack("<I", fh.read(4))[0]
        else:
            length = struct.unpack_from("<H", head, 6)[0]
        if fh.tell() + length > size:
            raise RejectedFile("truncated: file ends inside the File Meta Information")
        fh.seek(length, io.SEEK_CUR)


def _check_complete(path: Path, offset: int, transfer_syntax: str) -> None:
    size = path.stat().st_size
    if offset >= size:
        raise RejectedFile("truncated: no data set after the File Meta Information")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                body = inflater.decompress(mapped[offset:])
            except zlib.error as exc:
                raise RejectedFile(f"corrupt deflate stream: {exc}") from exc
            if not inflater.eof:
                raise RejectedFile("truncated: the deflated data set ends before its deflate stream does")
            _Walker(body, explicit=True, little=True).walk_dataset(0, len(body))
            return
        walker = _Walker(
            mapped,
            explicit=transfer_syntax != ImplicitVRLittleEndian,
            little=transfer_syntax != ExplicitVRBigEndian,
        )
        walker.walk_dataset(offset, size)


class _Walker:
    """Walks element headers and lengths only; raises :class:`RejectedFile` on any overrun."""

    def __init__(self, buf: bytes | mmap.mmap, explicit: bool, little: bool) -> None:
        self.buf = buf
        self.explicit = explicit
        self.order = "<" if little else ">"

    def walk_dataset(self, pos: int, end: int, in_item: bool = False, depth: int = 0) -> int:
        if depth > 64:
            raise RejectedFile("malformed: sequences nested more than 64 deep")
        while pos < end:
            group, element = self._tag(pos, end)
            if (group, element) == ITEM_END and in_item:
                return pos + 8
            pos, length, vr = self._element_header(pos, end, group)
            if length == UNDEFINED:
                explicit_inside = self.explicit and vr != b"UN"
                pos = self._walk_items(pos, end, explicit_inside, depth + 1)
            else:
                if pos + length > end:
                    raise RejectedFile(
                        f"truncated: element ({group:04X},{element:04X}) declares {length} bytes "
                        f"but only {end - pos} remain"
                    )
                pos += length
        if in_item:
            raise RejectedFile("truncated: file ends inside a sequence item")
        return pos

    def collect(self, wanted: dict[int, str], last_group: int) -> dict[str, bytes]:
        """Values of the ``wanted`` top-level tags, reading no further than ``last_group``."""
        found: dict[str, bytes] = {}
        pos, end = 0, len(self.buf)
        while pos < end:
            group, element = self._tag(pos, end)
            if group > last_group:
                break
            pos, length, vr = self._element_header(pos, end, group)
            if length == UNDEFINED:
                pos = self._walk_items(pos, end, self.explicit and vr != b"UN", 1)
                continue
            if pos + length > end:
                raise RejectedFile(f"truncated: element ({group:04X},{element:04X}) overruns the data set")
            name = wanted.get((group << 16) | element)
            if name is not None:
                found[name] = bytes(self.buf[pos : pos + length])
            pos += length
        return found

    def _tag(self, pos: int, end: int) -> tuple[int, int]:
        if end - pos < 8:
            raise RejectedFile(f"truncated: file ends inside an element header ({end - pos} bytes left)")
        return struct.unpack_from(self.order + "HH", self.buf, pos)

    def _element_header(self, pos: int, end: int, group: int) -> tuple[int, int, bytes]:
        if self.explicit and group != 0xFFFE:
            vr = bytes(self.buf[pos + 4 : pos + 6])
            if vr in LONG_VRS:
                if end - pos < 12:
                    raise RejectedFile("truncated: file ends inside an element header")
                return pos + 12, struct.unpack_from(self.order + "I", self.buf, pos + 8)[0], vr
            return pos + 8, struct.unpack_from(self.order + "H", self.buf, pos + 6)[0], vr
        return pos + 8, struct.unpack_from(self.order + "I", self.buf, pos + 4)[0], b""

    def _walk_items(self, pos: int, end: int, explicit_inside: bool, depth: int) -> int:
        inner = self if explicit_inside == self.explicit else _Walker(self.buf, explicit_inside, self.order == "<")
        while True:
            tag = self._tag(pos, end)
            length = struct.unpack_from(self.order + "I", self.buf, pos + 4)[0]
            pos += 8
            if tag == SEQ_END:
                return pos
            if tag != ITEM:
                raise RejectedFile(f"malformed: expected an item tag in an undefined-length value, found {tag}")
            if length == UNDEFINED:
                pos = inner.walk_dataset(pos, end, in_item=True, depth=depth)
            elif pos + length > end:
                raise RejectedFile(f"truncated: an item declares {length} bytes but only {end - pos} remain")
            else:
                pos += length


def _header(ds: pydicom.Dataset) -> InstanceHeader:
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise RejectedFile("missing required attribute(s): " + ", ".join(missing))
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    return _checked(InstanceHeader(
        sop_instance_uid=str(ds.SOPInstanceUID).strip(),
        sop_class_uid=str(ds.SOPClassUID).strip(),
        transfer_syntax_uid=str(transfer_syntax).strip(),
        study_instance_uid=str(ds.StudyInstanceUID).strip(),
        series_instance_uid=str(ds.SeriesInstanceUID).strip(),
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
    ))


_UID_FIELDS = (("sop_instance_uid", "SOP Instance UID"), ("sop_class_uid", "SOP Class UID"),
               ("study_instance_uid", "Study Instance UID"), ("series_instance_uid", "Series Instance UID"))


def _checked(header: InstanceHeader) -> InstanceHeader:
    """Identifying UIDs the queue can index on any database: at most 64 characters (PS3.5 9.1), no control
    characters or NUL; otherwise :class:`RejectedFile` (refused for good, kept in quarantine)."""
    for field, name in _UID_FIELDS:
        value = getattr(header, field)
        if len(value) > 64:
            raise RejectedFile(f"{name} of {len(value)} characters (at most 64, PS3.5 9.1)")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise RejectedFile(f"{name} holds a control character or NUL")
    return header


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_tags(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """The attributes routing rules name (``gateway.routing``), as text, from a Part-10 file's header (pixel
    data not read). ``keys``: keywords or ``"gggg,eeee"``. An attribute absent at the top level is looked for
    in the first item of the Request Attributes Sequence (0040,0275), where images carry the request's
    Requested Procedure Priority and ID; absent there too: "". Raises ValueError for an unknown keyword."""
    if not keys:
        return {}
    tags = {key: _tag(key) for key in keys}
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    request = ds.get((0x0040, 0x0275))
    nested = request.value[0] if request is not None and request.VR == "SQ" and request.value else None
    found = {}
    for key, tag in tags.items():
        element = ds.get(tag) if tag in ds else (nested.get(tag) if nested is not None and tag in nested else None)
        found[key] = _as_text(element.value) if element is not None and element.VR != "SQ" else ""
    return found


def _tag(key: str) -> pydicom.tag.BaseTag:
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    if "," in key:
        group, element = key.split(",", 1)
        return Tag(int(group, 16), int(element, 16))
    value = tag_for_keyword(key)
    if value is None:
        raise ValueError(f"{key!r} is not a DICOM keyword (routing rule tags)")
    return Tag(value)


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()
