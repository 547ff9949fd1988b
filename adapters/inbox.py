"""Inbound bundles on disk: resume-able partial files, verification, and import into the spool.

A bundle being received is ``<spool>/inbox/<manifest sha256>.part`` (the name comes from the hash we
were offered and checked to be 64 hex digits, never from a name on the wire). Its length is how far we
got: a new offer of the same bundle resumes at that length rounded down to whole chunks (the format's
64 KiB). When the last byte arrives the file is fsynced and verified end to end (``verify_bundle``:
manifest, every file's size and SHA-256, the manifest's own SHA-256 against the offer); each instance is
then staged, checked as a complete Part-10 file and recorded through the same ``IngestService`` as
network instances, in a unit whose ``origin_peer`` is the sender. A bundle that fails verification is
moved to quarantine with the reason, so the sender's retry starts from zero with nothing lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from adapters.dicom_files import RejectedFile, inspect_part10_file
from adapters.spool import Spool
from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleError, file_offsets, read_manifest, resume_offset, verify_bundle
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
        """Verify, call ``on_verified``, import; (True, summary) or (False, reason). Runs on a worker thread."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        try:
            with self.path.open("rb") as fh:
                manifest, _start = read_manifest(fh)
            if hashlib.sha256(manifest.encode()).hexdigest() != self.manifest_sha256:
                raise BundleError("the manifest's SHA-256 differs from the one in the offer")
            verify_bundle(self.path, self.size)
            if on_verified is not None:
                on_verified()
            imported = self._import()
        except (BundleError, RejectedFile) as exc:
            kept = self.spool.quarantine(self.path, f"bundle from {self.peer_jid} rejected: {exc}")
            log.warning("rejected bundle from %s: %s (kept at %s)", self.peer_jid, exc, kept)
            return False, str(exc)
        os.unlink(self.path)  # every instance in it is now fsynced in the spool and committed
        return True, f"{imported} instance(s) of study {manifest.study_instance_uid} verified and stored"

    def _import(self) -> int:
        with self.path.open("rb") as fh:
            manifest, start = read_manifest(fh)
            for entry, position in file_offsets(manifest, start):
                fh.seek(position)
                remaining = entry.size

                def chunks() -> object:
                    nonlocal remaining
                    while remaining > 0:
                        block = fh.read(min(1 << 20, remaining))
                        remaining -= len(block)
                        yield block

                staged = self.spool.stage_bytes(chunks())  # type: ignore[arg-type]
                try:
                    header = inspect_part10_file(staged.temp_path)
                except RejectedFile:
                    self.spool.discard(staged)
                    raise
                if header.sop_instance_uid != entry.sop_instance_uid or staged.sha256 != entry.sha256:
                    self.spool.discard(staged)
                    raise BundleError(f"instance {entry.sop_instance_uid} does not match its manifest entry")
                self.ingest.ingest(header, staged, f"xmpp:{self.peer_jid}", origin_peer=self.peer_jid)
        return len(manifest.files)
