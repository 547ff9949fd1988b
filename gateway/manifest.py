"""A study on the wire: the bundle format (a protocol between sites; version 1).

One offer carries one study unit as one byte stream, the *bundle*::

    offset 0   8 bytes   magic  b"DICOMGW\\x01"
    offset 8   4 bytes   big-endian length M of the manifest
    offset 12  M bytes   manifest: canonical JSON (UTF-8, sorted keys, no spaces)
    then       the instance files, byte for byte, in manifest order, no padding

The manifest::

    {"format": 1, "study_instance_uid": "...", "unit_seq": 1, "instances": N, "total_bytes": T,
     "chunk_bytes": C, "files": [{"sop_instance_uid": "...", "sop_class_uid": "...",
     "transfer_syntax_uid": "...", "size": S, "sha256": "..."}, ...]}

Files are ordered by (series, instance number, SOP Instance UID) and the JSON is canonical, so the bundle's
bytes are identical on every resend: its SHA-256 (``bundle_sha256``) names it, and a receiver that kept
the first ``k * C`` bytes resumes at offset ``k * C`` (XEP-0096 ``<range offset>``). The stream is framed in
fixed chunks of ``chunk_bytes`` (the last shorter): a later version can seal each chunk with AES-GCM
(a fixed per-chunk overhead) without changing how offsets and resume work. Receivers verify every file's
size and SHA-256 and the manifest's totals before they accept a study; names on the wire are never paths.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"DICOMGW\x01"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 16
READ_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20


class BundleError(ValueError):
    """A bundle that does not match its manifest or the format; the message is the refusal reason."""


@dataclass(frozen=True)
class BundleFile:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    study_instance_uid: str
    unit_seq: int
    chunk_bytes: int
    files: tuple[BundleFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        body = {
            "format": FORMAT_VERSION,
            "study_instance_uid": self.study_instance_uid,
            "unit_seq": self.unit_seq,
            "instances": len(self.files),
            "total_bytes": self.total_bytes,
            "chunk_bytes": self.chunk_bytes,
            "files": [f.__dict__ for f in self.files],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def header(self) -> bytes:
        encoded = self.encode()
        return MAGIC + struct.pack(">I", len(encoded)) + encoded

    @property
    def bundle_bytes(self) -> int:
        return len(self.header()) + self.total_bytes

    @staticmethod
    def decode(data: bytes) -> Manifest:
        try:
            body = json.loads(data.decode("utf-8"))
            if not isinstance(body, dict) or not isinstance(body.get("files"), list):
                raise BundleError("manifest is not a JSON object with a file list")
            if body.get("format") != FORMAT_VERSION:
                raise BundleError(f"unsupported bundle format {body.get('format')!r}")
            files = tuple(
                BundleFile(
                    sop_instance_uid=str(f["sop_instance_uid"]),
                    sop_class_uid=str(f["sop_class_uid"]),
                    transfer_syntax_uid=str(f["transfer_syntax_uid"]),
                    size=int(f["size"]),
                    sha256=str(f["sha256"]),
                )
                for f in body["files"]
            )
            manifest = Manifest(str(body["study_instance_uid"]), int(body["unit_seq"]), int(body["chunk_bytes"]), files)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"manifest is not valid: {exc}") from exc
        if manifest.total_bytes != int(body.get("total_bytes", -1)) or len(files) != int(body.get("instances", -1)):
            raise BundleError("manifest totals do not match its file list")
        if any(f.size < 0 or len(f.sha256) != 64 for f in files) or manifest.chunk_bytes <= 0:
            raise BundleError("manifest has a negative size, a malformed SHA-256 or a bad chunk size")
        return manifest


def stream_bundle(manifest: Manifest, paths: list[Path], offset: int = 0, read_bytes: int = READ_BYTES) -> Iterator[bytes]:
    """Yield the bundle's bytes from ``offset`` on, reading the files lazily (memory stays flat)."""
    if len(paths) != len(manifest.files):
        raise ValueError("one path per manifest file is needed")
    position = 0
    header = manifest.header()
    if offset < len(header):
        yield header[offset:]
    position = len(header)
    for path, entry in zip(paths, manifest.files, strict=True):
        end = position + entry.size
        if offset < end:
            skip = max(0, offset - position)
            with path.open("rb") as fh:
                fh.seek(skip)
                remaining = entry.size - skip
                while remaining > 0:
                    block = fh.read(min(read_bytes, remaining))
                    if not block:
                        raise BundleError(f"{path} is shorter than its manifest entry")
                    remaining -= len(block)
                    yield block
        position = end


def read_manifest(fh: BinaryIO) -> tuple[Manifest, int]:
    """Read the header of a bundle file; returns the manifest and the offset of the first instance."""
    head = fh.read(12)
    if len(head) < 12 or head[:8] != MAGIC:
        raise BundleError("not a dicomgw bundle (bad magic)")
    (length,) = struct.unpack(">I", head[8:12])
    if length > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest of {length} bytes is larger than allowed")
    data = fh.read(length)
    if len(data) != length:
        raise BundleError("bundle ends inside its manifest")
    return Manifest.decode(data), 12 + length


def verify_bundle(path: Path, expected_bundle_bytes: int | None = None) -> Manifest:
    """Check a received bundle end to end: header, each file's size and SHA-256, nothing after the last file."""
    size = path.stat().st_size
    if expected_bundle_bytes is not None and size != expected_bundle_bytes:
        raise BundleError(f"bundle is {size} bytes, the offer said {expected_bundle_bytes}")
    with path.open("rb") as fh:
        manifest, position = read_manifest(fh)
        if position + manifest.total_bytes != size:
            raise BundleError(f"bundle is {size} bytes, its manifest accounts for {position + manifest.total_bytes}")
        for entry in manifest.files:
            digest = hashlib.sha256()
            remaining = entry.size
            while remaining > 0:
                block = fh.read(min(READ_BYTES, remaining))
                if not block:
                    raise BundleError(f"bundle ends inside {entry.sop_instance_uid}")
                digest.update(block)
                remaining -= len(block)
            if digest.hexdigest() != entry.sha256:
                raise BundleError(f"SHA-256 mismatch for instance {entry.sop_instance_uid}")
    return manifest


def file_offsets(manifest: Manifest, data_start: int) -> Iterator[tuple[BundleFile, int]]:
    position = data_start
    for entry in manifest.files:
        yield entry, position
        position += entry.size


def resume_offset(received_bytes: int, chunk_bytes: int) -> int:
    """The offset a receiver asks for when it already holds ``received_bytes``: whole chunks only."""
    return (received_bytes // chunk_bytes) * chunk_bytes
