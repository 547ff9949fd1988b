"""Patient identity reconciled on import (the receiving gateway; issue 17 §3): ``[[import.coerce]]`` rules.

A study from hospital A lands in hospital B's PACS; A's Patient ID may be one of B's patients' IDs. Each rule
names the sending peers it applies to (``from``: bare JIDs or ``*`` patterns, first match wins) and says:

- ``set``: attributes set from templates (``{peer}`` bare JID, ``{peer_local}`` its local part,
  ``{peer_institution}``, ``{peer_department}`` per the naming standard, ``{peer_domain}`` the XMPP domain,
  ``{patient_id}`` the Patient ID as sent), e.g. ``IssuerOfPatientID = "{peer_institution}"``;
- ``patient_id_map``: a CSV file, ``foreign_id,local_id`` per line: the Patient ID becomes the local one; a
  patient not in it: ``on_unmapped = "prefix"`` (``prefix`` template + the foreign ID, default
  ``"{peer_institution}-"``) or ``"hold"`` (the study waits, ``held``, until the mapping is added and an admin
  releases it: ``dicomgw queue release UNIT``);
- ``remove``: attributes removed.

The originals go into the Original Attributes Sequence (PS3.3 C.12.1.1.9) on the way into the PACS
(``adapters.dicom_coerce``); the spool keeps the sender's files byte for byte.
"""

from __future__ import annotations

import csv
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CoerceError(ValueError):
    """A rule that cannot be used (named in the message)."""


@dataclass(frozen=True)
class CoerceRule:
    peers: tuple[str, ...]  # bare JIDs or fnmatch patterns
    set: tuple[tuple[str, str], ...] = ()  # (keyword, template)
    patient_id_map: Path | None = None
    on_unmapped: str = "prefix"  # prefix | hold
    prefix: str = "{peer_institution}-"
    remove: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class Coercion:
    """What to do to one study's instances: attributes to set (keyword -> value) and to remove."""

    rule: str
    set: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()

    def describe(self) -> str:
        """Names only (it goes into the receipt, over the XMPP server): the values are in the PACS."""
        parts = [", ".join(sorted(self.set)) + " set"] if self.set else []
        parts += [", ".join(self.remove) + " removed"] if self.remove else []
        return f"coerced by rule {self.rule!r}: {'; '.join(parts) or 'nothing'} (originals in Original Attributes Sequence)"


@dataclass(frozen=True)
class Hold:
    reason: str


def parse_rules(raw: Any, base_dir: Path) -> tuple[CoerceRule, ...]:
    if raw is None:
        return ()
    from pydicom.datadict import tag_for_keyword  # here: a CLI command without rules need not load pydicom
    if not isinstance(raw, list):
        raise CoerceError("import.coerce: a list of tables ([[import.coerce]])")
    rules = []
    for n, table in enumerate(raw, 1):
        where = f"import.coerce #{n}"
        if not isinstance(table, dict):
            raise CoerceError(f"{where}: must be a table")
        unknown = set(table) - {"name", "from", "set", "patient_id_map", "on_unmapped", "prefix", "remove"}
        if unknown:
            raise CoerceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        peers = table.get("from", ["*"])
        peers = [peers] if isinstance(peers, str) else peers
        sets = table.get("set", {})
        if not isinstance(sets, dict):
            raise CoerceError(f"{where}: set = {{ Keyword = \"template\" }}")
        for keyword in [*sets, *table.get("remove", [])]:
            if tag_for_keyword(str(keyword)) is None:
                raise CoerceError(f"{where}: {keyword!r} is not a DICOM keyword")
        if "PixelData" in sets or "PixelData" in table.get("remove", []):
            raise CoerceError(f"{where}: pixel data is never changed")
        on_unmapped = str(table.get("on_unmapped", "prefix"))
        if on_unmapped not in ("prefix", "hold"):
            raise CoerceError(f"{where}: on_unmapped {on_unmapped!r}: prefix or hold")
        mapping = table.get("patient_id_map")
        path = Path(mapping) if mapping else None
        if path is not None and not path.is_absolute():
            path = base_dir / path
        rules.append(CoerceRule(tuple(str(p) for p in peers), tuple((str(k), str(v)) for k, v in sets.items()), path,
                                on_unmapped, str(table.get("prefix", "{peer_institution}-")),
                                tuple(str(k) for k in table.get("remove", [])), str(table.get("name") or f"rule {n}")))
    return tuple(rules)


class Coercer:
    """Decides per study (peer, Patient ID as sent) which coercion applies; the CSV tables are re-read when
    they change (an admin adds a mapping, then releases the held study)."""

    def __init__(self, rules: tuple[CoerceRule, ...]) -> None:
        self.rules = rules
        self._tables: dict[Path, tuple[float, dict[str, str]]] = {}

    def rule_for(self, peer_jid: str) -> CoerceRule | None:
        return next((r for r in self.rules if any(fnmatch.fnmatchcase(peer_jid, p) for p in r.peers)), None)

    def plan(self, peer_jid: str, patient_id: str) -> Coercion | Hold | None:
        rule = self.rule_for(peer_jid)
        if rule is None:
            return None
        values = _variables(peer_jid, patient_id)
        sets = {keyword: template.format(**values) for keyword, template in rule.set}
        if rule.patient_id_map is not None:
            try:
                local = self._table(rule.patient_id_map).get(patient_id.strip())
            except CoerceError as exc:
                return Hold(f"held: {exc}; fix the file, then dicomgw queue release UNIT")
            if local is not None:
                sets["PatientID"] = local
            elif rule.on_unmapped == "hold":
                return Hold(f"held: Patient ID {patient_id!r} from {peer_jid} is not in {rule.patient_id_map} (rule "
                            f"{rule.name!r}); add it, then dicomgw queue release UNIT")
            else:
                sets["PatientID"] = (rule.prefix.format(**values) + patient_id)[:64]
        return Coercion(rule.name, sets, rule.remove)

    def _table(self, path: Path) -> dict[str, str]:
        try:
            stamp = os.stat(path).st_mtime
        except OSError:
            return {}
        cached = self._tables.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        table: dict[str, str] = {}
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    if len(row) >= 2 and row[0].strip() and not row[0].startswith("#") and row[0].strip() != "foreign_id":
                        table[row[0].strip()] = row[1].strip()[:64]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:  # no study goes in on a table that cannot be read
            raise CoerceError(f"{path}: cannot be read as a CSV table in UTF-8 ({exc})") from None
        self._tables[path] = (stamp, table)
        return table


def _variables(peer_jid: str, patient_id: str) -> dict[str, str]:
    local, _, domain = peer_jid.partition("@")
    department, _, institution = local.partition(".")
    return {"peer": peer_jid, "peer_local": local, "peer_domain": domain, "peer_department": department,
            "peer_institution": institution or local, "patient_id": patient_id}
