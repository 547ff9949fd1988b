"""Lossless compression of the bundle on the wire (negotiated per offer; the bundle itself never changes).

The sender turns the bundle's bytes from an offset on into *frames*; the receiver turns them back into
exactly those bytes, so offsets, resume and every file's SHA-256 are those of the original bundle::

    frame = kind (1 byte) | plain length (4 bytes, big-endian) | wire length (4 bytes) | payload
    kind 0: payload = the plain bytes;  kind 1: zstd;  kind 2: zstd of the bytes shuffled for 16-bit words
    (all low bytes, then all high bytes: uncompressed CT/MR pixels are 16-bit little-endian samples)

A frame holds one block of :func:`gateway.manifest.stream_bundle` (at most 1 MiB of one file or of the
header), compressed on its own: the receiver writes whole frames only, so whatever offset it resumes at
starts a new frame. Blocks of files in a compressed transfer syntax (JPEG, JPEG-LS, JPEG 2000, RLE, deflate,
MPEG/HEVC) go as they are. :class:`Adaptive` decides per block whether compressing pays: it keeps moving
averages of the compressor's time per byte, the ratio it reaches, and the time the link takes per wire byte
(the time the consumer spends between two frames), and compresses when
``compress_s + ratio_inverse * link_s < link_s`` per byte, probing every 16th block while it is off. On a
link slower than the compressor (a 10-100 Mbit/s health network) it compresses; on loopback, or on data
that does not compress, it switches itself off.
"""

from __future__ import annotations

import bisect
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from gateway.manifest import Manifest, stream_bundle

RAW, ZSTD, ZSTD_SHUFFLE2 = 0, 1, 2
HEADER = struct.Struct(">BII")
BLOCK_BYTES = 1 << 20  # plain bytes per frame at most
MAX_PLAIN_BYTES = 4 << 20  # what a receiver accepts in one frame
LEVEL = 1

#: Transfer syntaxes whose pixel data is already compressed (PS3.5 A.4, A.6, A.7 ...): sent as they are.
COMPRESSED_SYNTAX_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99",
                              "1.2.840.10008.1.2.8.")


def compressible(transfer_syntax_uid: str) -> bool:
    return not transfer_syntax_uid.startswith(COMPRESSED_SYNTAX_PREFIXES)


class FrameError(ValueError):
    """Bytes that are not a valid frame stream (the receiver closes the stream; the sender resumes later)."""


def shuffle2(data: bytes) -> bytes:
    even = len(data) & ~1
    return data[0:even:2] + data[1:even:2] + data[even:]


def unshuffle2(data: bytes) -> bytes:
    even = len(data) & ~1
    half = even // 2
    out = bytearray(len(data))
    out[0:even:2] = data[:half]
    out[1:even:2] = data[half:even]
    out[even:] = data[even:]
    return bytes(out)


@dataclass
class Adaptive:
    """Per-block decision: compress when it makes the stream faster (see the module docstring).

    The link's time per wire byte is the consumer's time between frames summed over the stream (a socket's
    buffer makes single frames look instantaneous); until ``evidence_bytes`` went out, compression stays on
    unless the probes show the data does not compress."""

    probe_every: int = 16
    evidence_bytes: int = 8 << 20
    compress_s_per_byte: float = 0.0
    ratio_inverse: float = 1.0  # wire bytes per plain byte when compressed
    link_s: float = 0.0
    link_wire_bytes: int = 0
    compressed_plain: int = 0
    compressed_wire: int = 0
    raw_bytes: int = 0
    _blocks: int = 0

    @property
    def link_s_per_byte(self) -> float:
        return self.link_s / self.link_wire_bytes if self.link_wire_bytes else 0.0

    def want(self) -> bool:
        self._blocks += 1
        if self.compressed_plain == 0 or self._blocks % self.probe_every == 0:
            return True  # no estimate yet, or a probe
        if self.ratio_inverse > 0.95:
            return False  # the data does not compress
        if self.link_wire_bytes < self.evidence_bytes:
            return True
        return self.compress_s_per_byte + self.ratio_inverse * self.link_s_per_byte < self.link_s_per_byte * 0.97

    def compressed(self, plain: int, wire: int, seconds: float) -> None:
        first = self.compressed_plain == 0
        self.compress_s_per_byte = _ewma(self.compress_s_per_byte, seconds / max(plain, 1), first=first)
        self.ratio_inverse = _ewma(self.ratio_inverse, min(1.0, wire / max(plain, 1)), first=first)
        self.compressed_plain += plain
        self.compressed_wire += wire

    def sent(self, wire: int, seconds: float) -> None:
        self.link_s += seconds
        self.link_wire_bytes += wire


def _ewma(old: float, new: float, weight: float = 0.25, first: bool = False) -> float:
    return new if old == 0.0 or first else old + weight * (new - old)


def encode_frames(manifest: Manifest, paths: list[Path], offset: int, adaptive: Adaptive | None = None) -> Iterator[bytes]:
    """The bundle from ``offset`` on as frames (see the module docstring)."""
    decide = adaptive or Adaptive()
    compressor = zstandard.ZstdCompressor(level=LEVEL)
    syntax_of_block = _syntax_walk(manifest, offset)
    for block in _blocks(stream_bundle(manifest, paths, offset)):
        kind, payload = RAW, block
        if compressible(syntax_of_block(len(block))) and decide.want():
            started = time.perf_counter()
            packed = compressor.compress(shuffle2(bytes(block)))
            decide.compressed(len(block), len(packed), time.perf_counter() - started)
            if len(packed) < len(block):
                kind, payload = ZSTD_SHUFFLE2, packed
        if kind == RAW:
            decide.raw_bytes += len(block)
        frame = HEADER.pack(kind, len(block), len(payload)) + payload
        handed = time.perf_counter()
        yield frame
        decide.sent(len(frame), time.perf_counter() - handed)


class Tally:
    """The stream handed to a bytestream, counted both ways: ``plain_at(wire)`` is how many of the bundle's
    own bytes the first ``wire`` bytes of the stream carry (whole frames, and the share of the frame under
    way), so progress and transfer rows count study bytes whether the stream is compressed or not."""

    def __init__(self, chunks: Iterator[bytes], framed: bool) -> None:
        self._chunks, self.framed = chunks, framed
        self._wire_ends: list[int] = []  # per frame: stream bytes up to its end, and bundle bytes up to its end
        self._plain_ends: list[int] = []
        self.wire = 0

    _OWN = frozenset({"_chunks", "framed", "_wire_ends", "_plain_ends", "wire"})

    def __getattr__(self, name: str) -> object:
        """The wrapped source's own attributes (a routine stream's ``on_suspend``/``suspended``,
        ``gateway.dispatch``) stay visible to the transport through the wrapper."""
        return getattr(self.__dict__["_chunks"], name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._chunks, name, value)

    def __iter__(self) -> Tally:
        return self

    def __next__(self) -> bytes:
        chunk = next(self._chunks)
        self.wire += len(chunk)
        if self.framed:
            plain = HEADER.unpack_from(chunk)[1]
            self._wire_ends.append(self.wire)
            self._plain_ends.append((self._plain_ends[-1] if self._plain_ends else 0) + plain)
        return chunk

    def plain_at(self, wire: int) -> int:
        if not self.framed:
            return wire
        index = bisect.bisect_right(self._wire_ends, wire)  # frames wholly within ``wire``
        done_wire = self._wire_ends[index - 1] if index else 0
        done_plain = self._plain_ends[index - 1] if index else 0
        if index >= len(self._wire_ends) or wire <= done_wire:
            return done_plain
        frame_wire = self._wire_ends[index] - done_wire
        frame_plain = self._plain_ends[index] - done_plain
        return done_plain + (wire - done_wire) * frame_plain // frame_wire


def _blocks(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """At most BLOCK_BYTES each (a long manifest header is split)."""
    for piece in pieces:
        for start in range(0, len(piece), BLOCK_BYTES):
            yield piece[start:start + BLOCK_BYTES]


def _syntax_walk(manifest: Manifest, offset: int) -> Callable[[int], str]:
    """A function giving the transfer syntax of each next block (blocks never span two files)."""
    starts, syntaxes = [0], ["header"]
    position = len(manifest.header())
    for entry in manifest.files:
        starts.append(position)
        syntaxes.append(entry.transfer_syntax_uid)
        position += entry.size
    state = [offset, max(0, bisect.bisect_right(starts, offset) - 1)]

    def next_block(length: int) -> str:
        at, index = state
        while index + 1 < len(starts) and starts[index + 1] <= at:
            index += 1
        state[0], state[1] = at + length, index
        return syntaxes[index]

    return next_block


class FrameDecoder:
    """Receiver: wire bytes in, original bundle bytes out, whole frames only; hostile input raises
    :class:`FrameError` (a frame bigger than allowed, an unknown kind, a payload that does not decode to
    its announced length)."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._decompressor = zstandard.ZstdDecompressor()
        self.wire_bytes = 0

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        self._pending += data
        self.wire_bytes += len(data)
        out = []
        while len(self._pending) >= HEADER.size:
            kind, plain, wire = HEADER.unpack_from(self._pending)
            if kind not in (RAW, ZSTD, ZSTD_SHUFFLE2) or plain > MAX_PLAIN_BYTES or wire > MAX_PLAIN_BYTES + 1024:
                raise FrameError(f"bad frame header: kind {kind}, {plain} plain bytes, {wire} on the wire")
            if kind == RAW and wire != plain:
                raise FrameError("a raw frame whose two lengths differ")
            if len(self._pending) < HEADER.size + wire:
                break
            payload = bytes(self._pending[HEADER.size:HEADER.size + wire])
            del self._pending[:HEADER.size + wire]
            out.append(payload if kind == RAW else self._inflate(kind, payload, plain))
        return out

    def _inflate(self, kind: int, payload: bytes, plain: int) -> bytes:
        try:  # the announced size is checked before anything is allocated (a zstd bomb is refused unread)
            if zstandard.frame_content_size(payload) != plain:
                raise FrameError(f"a frame whose zstd content size is not the announced {plain} bytes")
            data = self._decompressor.decompress(payload, max_output_size=plain)
        except zstandard.ZstdError as exc:
            raise FrameError(f"a frame that does not decompress: {exc}") from exc
        if len(data) != plain:
            raise FrameError(f"a frame that decompresses to {len(data)} bytes, announced {plain}")
        return unshuffle2(data) if kind == ZSTD_SHUFFLE2 else data

    @property
    def pending(self) -> int:
        return len(self._pending)

    def wanted(self) -> int:
        """Bytes that complete the frame under way (its header first)."""
        if len(self._pending) < HEADER.size:
            return HEADER.size - len(self._pending)
        return HEADER.size + HEADER.unpack_from(self._pending)[2] - len(self._pending)
