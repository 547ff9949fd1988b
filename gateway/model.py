"""Plain domain types shared by the core and the edges (no I/O, no ORM).

``InstanceHeader`` is what an edge extracts from a DICOM data set before the core records it: only the
identifying and descriptive attributes (PS3.3 Patient/Study/Series/SOP Common modules). ``StagedFile`` is a
file an edge has written and fsynced under a temporary name; the core decides its final place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: dot-separated numeric components without leading zeros, at most 64 characters."""
    return 0 < len(value) <= 64 and UID_RE.match(value) is not None


class IngestOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, identical bytes: a no-op
    CONFLICT = "conflict"  # same SOP Instance UID, different bytes: kept beside the first, flagged


@dataclass(frozen=True)
class InstanceHeader:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    study_description: str = ""
    study_date: str = ""
    accession_number: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None


@dataclass(frozen=True)
class StagedFile:
    temp_path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    unit_id: int
    sop_instance_uid: str
    spool_path: Path | None


@dataclass(frozen=True)
class StudySummary:
    unit_id: int
    study_instance_uid: str
    unit_seq: int
    state: str
    patient_name: str
    patient_id: str
    study_description: str
    modalities: str
    instances: int
    size_bytes: int
    destination: str | None
    created_at: datetime
    last_instance_at: datetime
    state_changed_at: datetime
    flags: str
    error: str | None
    origin_peer: str | None = None
    method: str | None = None
    progress_bytes: int = 0
    bundle_bytes: int = 0
    attempts: int = 0
    next_attempt_at: datetime | None = None
    bundle_sha256: str | None = None  # the manifest SHA-256 of the bundle that carries (carried) this unit
    receipt_at: datetime | None = None  # sender: receipt came; receiver: the sender acknowledged our receipt
    purged_at: datetime | None = None  # spool files removed by the retention policy
    archived_at: datetime | None = None  # its instance and transfer rows moved to the archive tables
    priority: str = "routine"  # "stat" goes ahead of routine and ignores transfer windows
    rule: str | None = None  # the routing rule that queued it
    instances_of: int | None = None  # a copy of that unit for a further destination: sends its instances


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    instance_number: int | None
    size_bytes: int
    sha256: str
    spool_path: str
    conflict: bool
    source: str
    received_at: datetime
    instance_id: int = 0
    pacs_status: int | None = None  # the local PACS's last C-STORE status for this instance
    pacs_verdict: str | None = None  # gateway.importing.Verdict
    pacs_detail: str | None = None


DIRECTIONS = ("both", "send", "receive")  # a peer we exchange with both ways, only send to, only receive from


@dataclass(frozen=True)
class PeerConfig:
    """What the admin set for one peer gateway (``dicomgw peers``)."""

    jid: str
    name: str = ""
    fingerprint: str | None = None
    destinations: tuple[str, ...] = ()  # routing destinations this peer serves besides its own address
    max_concurrent: int = 1  # routine transfers to it at once (a STAT study may add one more)
    directions: str = "both"
    schedule: str = ""  # transfer windows for routine studies (gateway.windows); "" = always
    allowed: bool = True

    @property
    def may_send_to(self) -> bool:
        return self.allowed and self.directions in ("both", "send")

    @property
    def may_receive_from(self) -> bool:
        return self.allowed and self.directions in ("both", "receive")
