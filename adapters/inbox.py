"""Inbound bundles on disk: resume-able partial files, verification, and import into the spool.

A bundle being received is ``<spool>/inbox/<manifest sha256>.part`` (the name comes from the hash we
were offered and checked to be 64 hex digits, never from a name on the wire). Its length is how far we
got: a new offer of the same bundle resumes at that length rounded down to whole chunks (the format's
64 KiB). When the last byte arrives the bundle is verified end to end in one pass while its files are
copied into staging (manifest, every file's size and SHA-256, the manifest's own SHA-256 against the
offer); then all instances are fsynced, placed and recorded through the same ``IngestService`` as network
instances (in one transaction), in a unit whose ``origin_peer`` is the sender. A bundle that fails verification is
moved to quarantine with the reason, so the sender's retry starts from zero with nothing lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from adapters.dicom_files import RejectedFile, header_from_part10_prefix, inspect_part10_file
from adapters.spool import Spool
from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleError, BundleFile, read_manifest, resume_offset
from gateway.model import InstanceHeader, StagedFile
from gateway.service import IngestService

log = logging.getLogger(__name__)
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class InboundBundle:
    """The sink for one offered bundle (``adapters.xmpp.agent.Sink``)."""

    def __init__(self, spool: Spool, ingest: IngestService, peer_jid: str, manifest_sha256: str, size: int) -> None:
        if not HEX64.match(manifest_sha256):
            raise ValueError("manifest hash must be 64 lower-case hex digits")
        self.spool = spool
        self.ingest = ingest
        self.peer_jid = peer_jid
        self.manifest_sha256 = manifest_sha256
        self.size = size
        self.path = spool.root / "inbox" / f"{manifest_sha256}.part"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self.path.stat().st_size if self.path.exists() else 0
        self.offset = min(resume_offset(kept, DEFAULT_CHUNK_BYTES), size)
        self._fh = self.path.open("r+b" if self.path.exists() else "w+b")
        self._fh.truncate(self.offset)
        self._fh.seek(self.offset)
        self.resumed_from = self.offset

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.size:
            raise ValueError(f"more bytes than offered ({self.offset + len(data)} > {self.size})")
        self._fh.write(data)
        self.offset += len(data)

    def close(self, reason: str) -> None:
        """Keep what arrived for a resume (the stream was cut or the gateway stops)."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        log.info("bundle %s from %s paused at %d of %d bytes: %s", self.manifest_sha256[:12], self.peer_jid, self.offset, self.size, reason)

    def finish(self, on_verified: Callable[[], None] | None = None) -> tuple[bool, str]:
        """Verify, call ``on_verified``, import; (True, summary) or (False, reason). Runs on a worker thread.

        One pass over the bundle: each file is hashed while it is copied into staging, checked against its
        manifest entry (size, SHA-256), and only when every file matched are they made durable together
        (fsync), placed, and recorded in one transaction. The partial bundle itself is not fsynced here:
        its instances are, and a bundle lost to a crash before that is simply sent again.
        """
        self._fh.flush()
        self._fh.close()
        staged: list[StagedFile] = []
        try:
            with self.path.open("rb") as fh:
                manifest, start = read_manifest(fh)
                if hashlib.sha256(manifest.encode()).hexdigest() != self.manifest_sha256:
                    raise BundleError("the manifest's SHA-256 differs from the one in the offer")
                actual = os.fstat(fh.fileno()).st_size
                if actual != self.size or start + manifest.total_bytes != actual:
                    raise BundleError(f"bundle is {actual} bytes; offer said {self.size}, manifest {start + manifest.total_bytes}")
                items = [self._stage(fh, entry, staged) for entry in manifest.files]
            self.spool.make_durable(staged)
            if on_verified is not None:
                on_verified()
            stored = self.ingest.ingest_batch(items, f"xmpp:{self.peer_jid}", origin_peer=self.peer_jid)
        except (BundleError, RejectedFile) as exc:
            for leftover in staged:
                self.spool.discard(leftover)
            kept = self.spool.quarantine(self.path, f"bundle from {self.peer_jid} rejected: {exc}")
            log.warning("rejected bundle from %s: %s (kept at %s)", self.peer_jid, exc, kept)
            return False, str(exc)
        except BaseException:
            for leftover in staged:
                self.spool.discard(leftover)
            raise
        os.unlink(self.path)  # every instance in it is now fsynced in the spool and committed
        return True, (f"{len(manifest.files)} instance(s) of study {manifest.study_instance_uid} verified and stored"
                      + (f" ({len(manifest.files) - stored} already here)" if stored < len(manifest.files) else ""))

    def _stage(self, fh: BinaryIO, entry: BundleFile, staged: list[StagedFile]) -> tuple[InstanceHeader, StagedFile]:
        """Copy one file of the bundle into staging while hashing it; its header from the first block read."""
        remaining = entry.size
        first: list[bytes] = []

        def chunks() -> Iterator[bytes]:
            nonlocal remaining
            while remaining > 0:
                block = fh.read(min(1 << 20, remaining))
                if not block:
                    raise BundleError(f"bundle ends inside {entry.sop_instance_uid}")
                remaining -= len(block)
                if not first:
                    first.append(block)
                yield block

        copy = self.spool.stage_bytes(chunks(), durable=False)
        staged.append(copy)
        if copy.size_bytes != entry.size or copy.sha256 != entry.sha256:
            raise BundleError(f"SHA-256 mismatch for instance {entry.sop_instance_uid}")
        try:
            header = header_from_part10_prefix(first[0] if first else b"", entry.transfer_syntax_uid)
        except (RejectedFile, ValueError, struct.error, OSError):
            header = inspect_part10_file(copy.temp_path)  # the full check when the first block is not enough
        if header.sop_instance_uid != entry.sop_instance_uid:
            raise BundleError(f"instance {entry.sop_instance_uid} does not match its manifest entry")
        return header, copy
