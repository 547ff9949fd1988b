"""Modality Performed Procedure Step (the gateway as MPPS SCP, PS3.4 F.7; IHE RAD-6/7): a modality says "this
procedure is complete: these are its instances", and the study need not wait out ``stable_age_s``.

- N-CREATE (IN PROGRESS) records the step; a second N-CREATE of the same SOP Instance is refused 0x0111.
- N-SET changes it; once COMPLETED or DISCONTINUED it may no longer be updated (0x0110 with that reason, PS3.4
  F.7.2.2), an unknown step is 0x0112.
- :meth:`MppsService.tick` (each completeness tick): a COMPLETED step whose referenced instances (its Performed
  Series Sequence) are all in the queue makes their units ``stable`` at once; while one is missing it waits (that
  instance's arrival settles it; the stable-age rule keeps running beside it). DISCONTINUED: ``[dicom]
  on_discontinued = "send"`` treats it as completed, ``"hold"`` flags its units ``held`` (stable age no longer
  applies) until ``dicomgw queue release`` (or ``drop``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
DUPLICATE, NO_SUCH_INSTANCE, PROCESSING_FAILURE, INVALID_VALUE = 0x0111, 0x0112, 0x0110, 0x0106


@dataclass(frozen=True)
class StepMessage:
    """What an N-CREATE or N-SET data set says (parsed by ``adapters.dicom_mpps``)."""

    status: str | None
    study_uids: list[str] = field(default_factory=list)
    refs: list[tuple[str, str]] | None = None  # None: the message had no Performed Series Sequence
    reason: str = ""  # discontinuation reason (code meaning)


class MppsService:
    def __init__(self, store: object, on_discontinued: str = "send") -> None:
        self.store, self.on_discontinued = store, on_discontinued

    def create(self, calling_ae: str, sop_instance_uid: str, message: StepMessage) -> tuple[int, str]:
        if message.status != IN_PROGRESS:
            return INVALID_VALUE, f"Performed Procedure Step Status must be IN PROGRESS at N-CREATE, not {message.status!r}"
        if not self.store.mpps_create(sop_instance_uid, calling_ae, message.study_uids, message.refs or []):  # type: ignore[attr-defined]
            return DUPLICATE, f"MPPS {sop_instance_uid} exists already"
        return 0x0000, ""

    def set(self, calling_ae: str, sop_instance_uid: str, message: StepMessage) -> tuple[int, str]:
        step = self.store.mpps_step(sop_instance_uid)  # type: ignore[attr-defined]
        if step is None:
            return NO_SUCH_INSTANCE, f"no MPPS {sop_instance_uid}"
        if step["status"] != IN_PROGRESS:
            return PROCESSING_FAILURE, f"Performed Procedure Step Object may no longer be updated (it is {step['status']})"
        if message.status is not None and message.status not in STATUSES:
            return INVALID_VALUE, f"Performed Procedure Step Status {message.status!r}"
        self.store.mpps_update(sop_instance_uid, message.status, message.refs, message.study_uids, message.reason)  # type: ignore[attr-defined]
        return 0x0000, ""

    def tick(self) -> list[int]:
        """Settle the completed and discontinued steps that can be: the units made stable now (ids)."""
        moved: list[int] = []
        for step in self.store.mpps_unsettled():  # type: ignore[attr-defined]
            uids = [uid for _cls, uid in step["refs"]]
            if step["status"] == DISCONTINUED and self.on_discontinued == "hold":
                units = self.store.open_units_of(uids)  # type: ignore[attr-defined]
                self.store.hold_units(units, f"held: MPPS {step['sop_instance_uid']} was DISCONTINUED"  # type: ignore[attr-defined]
                                      f" ({step['reason'] or 'no reason given'}); dicomgw queue release|drop")
                self.store.mpps_settle(step["sop_instance_uid"])  # type: ignore[attr-defined]
                continue
            found = self.store.instance_states(uids)  # type: ignore[attr-defined]
            if not uids or any(uid not in found for uid in uids):
                continue  # a referenced instance has not arrived yet: settled when it does
            units = self.store.open_units_of(uids)  # type: ignore[attr-defined]
            moved += self.store.make_stable(units, f"MPPS {step['sop_instance_uid']} {step['status']}: "  # type: ignore[attr-defined]
                                            f"all {len(uids)} referenced instance(s) received")
            self.store.mpps_settle(step["sop_instance_uid"])  # type: ignore[attr-defined]
        return moved
