"""Walk a data set's element structure as it streams in (PS3.5 7.1, 7.5), without keeping its values.

``DatasetWalker(transfer_syntax).feed(chunk)`` follows every top-level element header and skips its value;
an element or item of undefined length is followed into (sequence items, encapsulated pixel fragments,
nested data sets) until its delimiter. ``error`` is set at the first header that cannot be (an item tag
where an element must be, a delimiter outside its sequence, an item in a data set). ``complete()`` says the
bytes so far end exactly on a top-level element boundary with every undefined length closed: a data set
truncated inside its pixel data, or one with a length past its end, is not complete.

Only headers are parsed (a few hundred per instance); values are skipped by count, so the cost per byte
of pixel data is nil. Deflated data sets cannot be walked before inflating: the walker accepts them as
they come (``walkable`` is False) and the pydicom parse that follows judges them.
"""

from __future__ import annotations

import struct

LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
MAX_DEPTH = 64


class DatasetWalker:
    def __init__(self, transfer_syntax: str) -> None:
        self.walkable = transfer_syntax != DEFLATED
        self._explicit = transfer_syntax != IMPLICIT_LE
        self._order = ">" if transfer_syntax == EXPLICIT_BE else "<"
        # Each frame: ("data", explicit) inside a data set, ("items", explicit) inside an undefined-length value.
        self._stack: list[tuple[str, bool]] = [("data", self._explicit)]
        self._header = bytearray()
        self._skip = 0
        self.offset = 0  # bytes walked
        self.last_tag = 0
        self.error: str | None = None

    def feed(self, data: bytes | memoryview) -> None:
        if not self.walkable or self.error is not None:
            return
        view = memoryview(data)
        while view and self.error is None:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                self.offset += step
                view = view[step:]
                continue
            take = min(self._header_size() - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) < self._header_size():  # (an explicit VR header grows to 12 once its VR is known)
                continue
            self._element(bytes(self._header))
            self.offset += len(self._header)
            self._header.clear()

    def _header_size(self) -> int:
        kind, explicit = self._stack[-1]
        if kind == "items" or not explicit or len(self._header) < 6:
            return 8
        tag = self._tag(self._header)
        if tag >> 16 == 0xFFFE:
            return 8
        return 12 if bytes(self._header[4:6]) in LONG_VRS else 8

    def _tag(self, header: bytes | bytearray) -> int:
        group, element = struct.unpack_from(self._order + "HH", header)
        return (group << 16) | element

    def _element(self, header: bytes) -> None:
        tag = self._tag(header)
        self.last_tag = tag
        kind, explicit = self._stack[-1]
        if kind == "items":
            length = struct.unpack_from(self._order + "I", header, 4)[0]
            if tag == SEQUENCE_END:
                self._stack.pop()
            elif tag != ITEM:
                self.error = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence item must be"
            elif length == UNDEFINED:
                self._push(("data", explicit))
            else:
                self._skip = length
            return
        if tag >> 16 == 0xFFFE:
            if tag == ITEM_END and len(self._stack) > 1:
                self._stack.pop()
            else:
                self.error = f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) where a data element must be"
            return
        if explicit:
            vr = header[4:6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                self.error = f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR"
                return
            length = struct.unpack_from(self._order + ("I" if len(header) == 12 else "H"), header, 8 if len(header) == 12 else 6)[0]
        else:
            vr = b""
            length = struct.unpack_from(self._order + "I", header, 4)[0]
        if length == UNDEFINED:
            if explicit and vr not in (b"SQ", b"OB", b"OW", b"UN"):
                self.error = f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr.decode('ascii', 'replace')} has an undefined length"
                return
            self._push(("items", explicit and vr != b"UN"))  # UN of undefined length holds implicit VR (PS3.5 6.2.2)
        else:
            self._skip = length

    def _push(self, frame: tuple[str, bool]) -> None:
        if len(self._stack) >= MAX_DEPTH:
            self.error = f"sequences nested deeper than {MAX_DEPTH}"
        else:
            self._stack.append(frame)

    def complete(self) -> bool:
        if not self.walkable:
            return True
        return self.error is None and self._skip == 0 and not self._header and len(self._stack) == 1

    def problem(self) -> str:
        """Why the data set is not complete, in words for the quarantine reason and the C-STORE comment."""
        if self.error:
            return f"malformed data set at byte {self.offset}: {self.error}"
        where = f"({self.last_tag >> 16:04X},{self.last_tag & 0xFFFF:04X})"
        if self._skip:
            return f"data set ends {self._skip} bytes short of the end of element {where}"
        if self._header:
            return f"data set ends inside an element header after {where}"
        return f"data set ends inside a sequence or item of undefined length (last element {where})"
