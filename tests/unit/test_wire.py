"""Compressed frames on the wire: the receiver gets back exactly the bundle's bytes from any offset; hostile
frames are refused before anything large is allocated; the adaptive switch compresses only where it pays."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleFile, Manifest, stream_bundle
from gateway.wire import (
    HEADER,
    RAW,
    ZSTD,
    ZSTD_SHUFFLE2,
    Adaptive,
    FrameDecoder,
    FrameError,
    compressible,
    encode_frames,
    shuffle2,
    unshuffle2,
)

CT = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"


def bundle(tmp_path: Path, specs: list[tuple[int, str, bool]]) -> tuple[Manifest, list[Path]]:
    rng = random.Random(3)
    entries, paths = [], []
    for i, (size, syntax, smooth) in enumerate(specs):
        data = bytes((j // 300) % 7 for j in range(size)) if smooth else rng.randbytes(size)
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(data)
        paths.append(path)
        entries.append(BundleFile(f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.2", syntax, size, hashlib.sha256(data).hexdigest()))
    return Manifest("1.2.3", 1, DEFAULT_CHUNK_BYTES, tuple(entries)), paths


def decode(wire: bytes, piece: int) -> bytes:
    decoder, out = FrameDecoder(), bytearray()
    for start in range(0, len(wire), piece):
        for plain in decoder.feed(wire[start:start + piece]):
            out += plain
    assert decoder.pending == 0
    return bytes(out)


@pytest.mark.parametrize("offset", [0, 1, 12, 65536, 1_500_000, 2_600_000])
def test_frames_decode_to_the_bundle_bytes_from_any_offset(tmp_path: Path, offset: int) -> None:
    manifest, paths = bundle(tmp_path, [(1_300_000, CT, True), (700_000, JPEG, True), (600_001, CT, False)])
    expected = b"".join(stream_bundle(manifest, paths, offset))
    wire = b"".join(encode_frames(manifest, paths, offset))
    assert decode(wire, 9999) == expected
    if offset > 2_000_000:  # byte by byte too (a short tail keeps it quick)
        assert decode(wire, 1) == expected


def test_only_uncompressed_syntaxes_are_compressed(tmp_path: Path) -> None:
    manifest, paths = bundle(tmp_path, [(1_000_000, CT, True), (1_000_000, JPEG, True)])
    wire = b"".join(encode_frames(manifest, paths, 0))
    kinds, position = [], 0
    while position < len(wire):
        kind, plain, size = HEADER.unpack_from(wire, position)
        kinds.append((kind, plain))
        position += HEADER.size + size
    assert kinds[1][0] == ZSTD_SHUFFLE2  # the CT file: smooth data, compressed
    assert all(kind == RAW for kind, _ in kinds[2:])  # the JPEG file: as it is
    assert compressible(CT) and not compressible(JPEG) and not compressible("1.2.840.10008.1.2.5")


def adaptive(compress_ns: float, link_ns: float, ratio_inverse: float, evidence: int = 64 << 20) -> Adaptive:
    decide = Adaptive(compress_s_per_byte=compress_ns * 1e-9, ratio_inverse=ratio_inverse, compressed_plain=1,
                      link_s=link_ns * 1e-9 * evidence, link_wire_bytes=evidence)
    decide.want()  # the first block
    return decide


def test_a_fast_link_switches_compression_off_and_a_slow_one_on() -> None:
    fast = adaptive(2.0, 1.0, 0.4)  # loopback faster than the compressor
    slow = adaptive(2.0, 800.0, 0.4)  # 10 Mbit/s
    useless = adaptive(1.0, 800.0, 1.0)  # random bytes on a slow link
    young = adaptive(2.0, 1.0, 0.4, evidence=1 << 20)  # too little sent yet to judge the link: keep compressing
    decisions = {name: [a.want() for _ in range(31)] for name, a in
                 (("fast", fast), ("slow", slow), ("useless", useless), ("young", young))}
    assert all(decisions["slow"]) and all(decisions["young"])
    assert sum(decisions["fast"]) == 2 and sum(decisions["useless"]) == 2  # only the probes (every 16th block)


@given(st.binary(max_size=5000))
@settings(max_examples=200, deadline=None)
def test_shuffle_is_lossless(data: bytes) -> None:
    assert unshuffle2(shuffle2(data)) == data


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (HEADER.pack(7, 10, 10) + b"x" * 10, "bad frame header"),
        (HEADER.pack(RAW, 10, 11) + b"x" * 11, "two lengths differ"),
        (HEADER.pack(RAW, 5 << 20, 5 << 20), "bad frame header"),
        (HEADER.pack(ZSTD, 100, 5) + b"12345", "does not decompress|content size"),
    ],
)
def test_hostile_frames_are_refused(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        FrameDecoder().feed(frame)


def test_a_zstd_bomb_is_refused_before_it_is_inflated() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # 64 MiB of zeros in a few KiB
    with pytest.raises(FrameError, match="content size"):
        FrameDecoder().feed(HEADER.pack(ZSTD, 1000, len(bomb)) + bomb)


def test_tally_counts_study_bytes_through_compressed_frames(tmp_path: Path) -> None:
    """Progress counts the bundle's own bytes: a compressed stream's wire position maps to the plain bytes of
    the whole frames before it (and the share of the frame under way); the end maps to the bundle's size."""
    from gateway.wire import Tally

    plain_blocks = [bytes(1000), bytes(range(256)) * 4, bytes(3000)]
    frames = [HEADER.pack(ZSTD, len(b), len(p)) + p for b, p in
              ((b, zstandard.ZstdCompressor().compress(b)) for b in plain_blocks)]
    tally = Tally(iter(frames), framed=True)
    assert list(tally) == frames
    ends = [sum(len(f) for f in frames[:i + 1]) for i in range(3)]
    assert tally.plain_at(0) == 0 and tally.plain_at(ends[0]) == 1000 and tally.plain_at(ends[1]) == 2024
    assert tally.plain_at(ends[2]) == tally.plain_at(ends[2] + 99) == 5024  # the whole bundle, never past it
    assert 2024 < tally.plain_at(ends[1] + (ends[2] - ends[1]) // 2) < 5024  # half of the third frame
    raw = Tally(iter([b"abc", b"de"]), framed=False)
    assert list(raw) == [b"abc", b"de"] and raw.plain_at(4) == 4


def test_tally_keeps_the_sources_suspend_hooks_visible() -> None:
    """A routine stream's source carries on_suspend/suspended (gateway.dispatch): the transport sets and reads
    them through the wrapper (hidden, a STAT reset was recorded as a cut)."""
    from gateway.wire import Tally

    class Source:
        def __init__(self) -> None:
            self.on_suspend = None
            self.suspended = False

        def __iter__(self) -> Source:
            return self

        def __next__(self) -> bytes:
            raise StopIteration

    source = Source()
    tally = Tally(source, framed=False)  # type: ignore[arg-type]
    assert hasattr(tally, "on_suspend") and tally.suspended is False
    tally.on_suspend = print
    assert source.on_suspend is print
    source.suspended = True
    assert tally.suspended is True
    assert not hasattr(Tally(iter([b"x"]), framed=False), "on_suspend")
