"""Which studies go to which peers, and with which priority: the routing rules of ``[[routing.rules]]``.

Rules are tried in the order of the file; the first one whose every condition holds decides. A rule's
conditions (all optional; a rule with none matches every study):

- ``calling_ae``, ``called_ae``: the AE titles of the association that brought the study's first instance;
- ``modality``: any of the study's modalities (all its instances);
- ``folder``: the watched-folder subfolder the first instance came from (``"emergency"`` also matches
  ``emergency/ct``);
- ``tags``: DICOM attributes of the first instance, by keyword (``StudyDescription``) or tag (``"0040,1003"``):
  a plain value must equal the attribute (spaces at either end ignored), ``"re:PATTERN"`` must be found in
  it (RE2 syntax, searched in linear time whatever the value: no backreferences or lookaround; ``"re:(?i)trauma"``
  ignores case). Requested Procedure Priority (0040,1003) and
  other Request Attributes are also looked for in the first item of the Request Attributes Sequence
  (0040,0275), where images carry them. Priorities (Requested Procedure Priority (0040,1003), Scheduled
  Procedure Step Priority (0040,0009)) are compared ignoring case, and their plain values must be the
  standard's enumerated ones (PS3.3 C.4.11/C.4.10: ``STAT``, ``HIGH``, ``ROUTINE``, ``MEDIUM``, ``LOW``): a
  scanner writing ``stat`` or ``High`` matches; a rule value outside them can never match and
  :meth:`Rules.warnings` (shown by ``dicomgw route test`` and logged at start) says so.

Each condition takes a value or a list (any of them). A rule names one or several ``destinations``
(``department.institution`` per ``gateway.addressing``, or a JID) and a ``priority``: ``stat`` goes ahead of
routine work and ignores transfer windows. A study that no rule matches goes to ``[routing]
default_destination`` as routine (or stays ``stable`` when that is empty). :meth:`Rules.decide` explains
every rule it tried, for ``dicomgw route test``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2

from gateway.addressing import destination_jid
from gateway.model import PeerConfig, StudySummary
from gateway.terminal import quoted

log = logging.getLogger(__name__)

PRIORITIES = ("stat", "routine")
DEID_OPTIONS = ("retain_longitudinal_dates", "retain_device_identity", "clean_descriptors")
#: Attributes whose values are an enumerated priority (PS3.3): compared ignoring case.
PRIORITY_TAGS = frozenset({"RequestedProcedurePriority", "0040,1003", "ScheduledProcedureStepPriority", "0040,0009"})
PRIORITY_VALUES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")
_CONDITIONS = ("calling_ae", "called_ae", "modality", "folder")
_TAG_KEY = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


class RuleError(ValueError):
    """A routing rule that cannot be used (named in the message)."""


@dataclass(frozen=True)
class Match:
    """One condition value: a plain value (equal) or a compiled regular expression (found)."""

    text: str
    pattern: Any = None  # a compiled RE2 pattern (``google-re2``): matching time is linear in the value
    fold_case: bool = False  # an enumerated value compared ignoring case (priorities)

    def test(self, value: str) -> bool:
        value = value.strip()
        if self.pattern is not None:
            return bool(self.pattern.search(value))
        return value.upper() == self.text.strip().upper() if self.fold_case else value == self.text.strip()

    def __str__(self) -> str:
        return f"/{self.pattern.pattern}/" if self.pattern is not None else repr(self.text)


@dataclass(frozen=True)
class Rule:
    name: str
    destinations: tuple[str, ...]
    priority: str = "routine"
    conditions: tuple[tuple[str, tuple[Match, ...]], ...] = ()  # (calling_ae | called_ae | modality | folder)
    tags: tuple[tuple[str, tuple[Match, ...]], ...] = ()  # (keyword or "gggg,eeee", values)
    deidentify: str = ""  # "basic": PS3.15 Annex E Basic Profile before sending (adapters.dicom_deid)
    deid_options: tuple[str, ...] = ()  # retain_longitudinal_dates, retain_device_identity, clean_descriptors
    allow_burned_in: bool = False  # send instances with burned-in annotation de-identified anyway


@dataclass(frozen=True)
class StudyFacts:
    """What routing may look at: where the first instance came from, the study's modalities and the
    attributes the rules name (read from the first instance; missing ones are "")."""

    source: str = ""
    modalities: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def calling_ae(self) -> str:
        return _scp_titles(self.source)[0]

    @property
    def called_ae(self) -> str:
        return _scp_titles(self.source)[1]

    @property
    def folder(self) -> str:
        """The watched-folder subfolder of a ``folder:`` source ("" for a file at the top or another source)."""
        if not self.source.startswith("folder:"):
            return ""
        return self.source[len("folder:"):].rpartition("/")[0]


def scp_source(calling_ae: str, called_ae: str, host: str) -> str:
    """The ``source`` of an instance received by the Storage SCP: ``scp:CALLING\\CALLED@host``. A backslash
    cannot occur in an AE title (PS3.5 6.2, VR AE), so the two titles always split apart."""
    return f"scp:{calling_ae}\\{called_ae}@{host}"


def _scp_titles(source: str) -> tuple[str, str]:
    if not source.startswith("scp:"):
        return "", ""
    titles = source[len("scp:"):].rpartition("@")[0]
    calling, _, called = titles.partition("\\")
    return calling, called


@dataclass(frozen=True)
class Verdict:
    rule: str  # the rule's name, "default_destination", or "" (no destination)
    destinations: tuple[str, ...]
    priority: str
    explanation: tuple[str, ...]  # one line per rule tried, for ``dicomgw route test``


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...] = ()
    default_destination: str = ""

    def warnings(self) -> list[str]:
        """Conditions that can never hold (a priority value the standard does not define)."""
        found = []
        for rule in self.rules:
            for key, matches in rule.tags:
                if key in PRIORITY_TAGS:
                    found += [f"rule {rule.name!r}: tags.{key} {m.text!r} can never match: {key} is one of "
                              f"{', '.join(PRIORITY_VALUES)} (compared ignoring case)"
                              for m in matches if m.pattern is None and m.text.strip().upper() not in PRIORITY_VALUES]
        return found

    def tag_keys(self) -> tuple[str, ...]:
        """Every attribute some rule names (what to read from the first instance)."""
        return tuple(dict.fromkeys(key for rule in self.rules for key, _ in rule.tags))

    def decide(self, facts: StudyFacts) -> Verdict:
        lines: list[str] = []
        for rule in self.rules:
            failed, held = _check(rule, facts)
            if failed is None:
                lines.append(f"rule {rule.name!r} matches: {'; '.join(held) or 'it has no condition'}"
                             f" -> {', '.join(rule.destinations)} ({rule.priority})")
                return Verdict(rule.name, rule.destinations, rule.priority, tuple(lines))
            lines.append(f"rule {rule.name!r} does not match: {failed}")
        if self.default_destination:
            lines.append(f"no rule matched: default_destination -> {self.default_destination} (routine)")
            return Verdict("default_destination", (self.default_destination,), "routine", tuple(lines))
        lines.append("no rule matched and no default_destination: the study stays stable")
        return Verdict("", (), "routine", tuple(lines))


class Router:
    """Decides where a stable unit goes: reads its facts through ports (the first instance's source and
    the attributes the rules name), applies the rules and maps each destination to a peer JID: the allowed
    peer that lists it among the destinations it serves (``dicomgw peers edit --destinations``), else the
    destination's own address on ``domain``."""

    def __init__(self, rules: Rules, domain: str, store: Any, spool_root: Path,
                 read_tags: Callable[[Path, tuple[str, ...]], Mapping[str, str]] | None = None,
                 peers: Callable[[], Mapping[str, PeerConfig]] | None = None) -> None:
        self.rules = rules
        self.domain = domain
        self.store = store
        self.spool_root = spool_root
        self.read_tags = read_tags
        self.peers = peers or (lambda: {})
        self._facts: dict[int, StudyFacts] = {}  # a stable unit's instances no longer change: read it once

    def facts(self, unit: StudySummary) -> StudyFacts:
        if unit.unit_id in self._facts:
            return self._facts[unit.unit_id]
        if len(self._facts) > 10_000:
            self._facts.clear()
        self._facts[unit.unit_id] = found = self._read_facts(unit)
        return found

    def _read_facts(self, unit: StudySummary) -> StudyFacts:
        first = self.store.first_instance(unit.unit_id)
        modalities = tuple(unit.modalities.split("/")) if unit.modalities else ()
        tags: Mapping[str, str] = {}
        keys = self.rules.tag_keys()
        if first is not None and keys and self.read_tags is not None:
            try:
                tags = self.read_tags(self.spool_root / first.spool_path, keys)
            except (OSError, ValueError) as exc:
                log.warning("routing: cannot read the attributes of unit %s (%s): rules on tags see them empty",
                            unit.unit_id, exc)
        return StudyFacts(first.source if first is not None else "", modalities, tags)

    def __call__(self, unit: StudySummary) -> tuple[list[str], str, str] | None:
        """(peer JIDs, priority, rule) for ``gateway.store`` ``route_stable``; None: no destination."""
        verdict = self.rules.decide(self.facts(unit))
        if not verdict.destinations:
            return None
        jids = list(dict.fromkeys(self.peer_for(d) for d in verdict.destinations))
        return jids, verdict.priority, verdict.rule

    def peer_for(self, destination: str) -> str:
        for peer in self.peers().values():
            if peer.allowed and destination in peer.destinations:
                return peer.jid
        return destination_jid(destination, self.domain)


def _check(rule: Rule, facts: StudyFacts) -> tuple[str | None, list[str]]:
    """(None, what held) when every condition holds, else (the first that did not, ...)."""
    held: list[str] = []
    for name, matches in rule.conditions:
        if name == "modality":
            values, shown = facts.modalities, "/".join(facts.modalities)
        elif name == "folder":  # the subfolder or any folder above it
            parts = facts.folder.split("/") if facts.folder else []
            values, shown = tuple("/".join(parts[:n]) for n in range(1, len(parts) + 1)), facts.folder
        else:
            values = (getattr(facts, name),)
            shown = values[0]
        hit = next((m for m in matches for v in values if m.test(v)), None)
        if hit is None:
            return f"{name} {shown or '(none)'!r} is not {_any(matches)}", held
        held.append(f"{name} {shown!r} is {hit}" if name != "folder" else f"folder {shown!r} is in {hit}")
    for key, matches in rule.tags:
        value = facts.tags.get(key, "")
        hit = next((m for m in matches if m.test(value)), None)
        if hit is None:
            return f"{key} {value or '(empty)'!r} is not {_any(matches)}", held
        held.append(f"{key} {value!r} is {hit}")
    return None, held


def _any(matches: Sequence[Match]) -> str:
    return str(matches[0]) if len(matches) == 1 else "any of " + ", ".join(str(m) for m in matches)


# -- parsing ([[routing.rules]] in the TOML file) -------------------------------------------------------
def parse_rules(raw: Any, check_destination: Any = None) -> tuple[Rule, ...]:
    """``[[routing.rules]]`` tables -> rules; raises :class:`RuleError` naming the rule and key.
    ``check_destination(text)`` raises ValueError for a destination that is not an address."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RuleError("routing.rules: must be an array of tables ([[routing.rules]])")
    rules, names = [], set()
    for index, table in enumerate(raw, 1):
        if not isinstance(table, dict):
            raise RuleError(f"routing.rules #{index}: must be a table")
        name = str(table.get("name") or f"rule {index}")
        where = f"routing rule {quoted(name)}"
        if name in names:
            raise RuleError(f"{where}: a second rule has this name")
        names.add(name)
        unknown = set(table) - {"name", "destinations", "destination", "priority", "tags", "deidentify", "deid_options",
                                "allow_burned_in", *_CONDITIONS}
        if unknown:
            raise RuleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        destinations = _strings(table.get("destinations", table.get("destination", [])), f"{where}: destinations")
        if not destinations:
            raise RuleError(f"{where}: needs destinations = [\"department.institution\", ...]")
        for destination in destinations:
            if check_destination is not None:
                try:
                    check_destination(destination)
                except ValueError as exc:
                    raise RuleError(f"{where}: destination {quoted(destination)}: {exc}") from None
        priority = str(table.get("priority", "routine")).lower()
        if priority not in PRIORITIES:
            raise RuleError(f"{where}: priority {quoted(priority)}: use \"stat\" or \"routine\"")
        conditions = tuple((key, _matches(table[key], f"{where}: {key}")) for key in _CONDITIONS if key in table)
        tags_raw = table.get("tags", {})
        if not isinstance(tags_raw, dict):
            raise RuleError(f"{where}: tags must be a table, e.g. tags = {{ StudyDescription = \"re:(?i)trauma\" }}")
        tags = tuple((_tag_key(key, where), _matches(value, f"{where}: tags.{key}", _tag_key(key, where) in PRIORITY_TAGS))
                     for key, value in tags_raw.items())
        deidentify = str(table.get("deidentify", "") or "")
        if deidentify not in ("", "basic"):
            raise RuleError(f"{where}: deidentify {quoted(deidentify)}: \"basic\" (PS3.15 Annex E Basic Profile)")
        options = tuple(str(o) for o in table.get("deid_options", []))
        unknown_options = set(options) - set(DEID_OPTIONS)
        if unknown_options:
            raise RuleError(f"{where}: deid_options {', '.join(sorted(unknown_options))}: one of {', '.join(DEID_OPTIONS)}")
        if options and not deidentify:
            raise RuleError(f"{where}: deid_options without deidentify = \"basic\"")
        burned_in = table.get("allow_burned_in", False)
        if not isinstance(burned_in, bool):  # bool("false") is True: a quoted value would send burned-in pixels
            raise RuleError(f"{where}: allow_burned_in {quoted(burned_in)} is not true or false (write it without quotes)")
        rules.append(Rule(name, tuple(destinations), priority, conditions, tags, deidentify, options, burned_in))
    return tuple(rules)


def _tag_key(key: str, where: str) -> str:
    found = _TAG_KEY.match(key.strip())
    if found:
        return f"{found.group(1).upper()},{found.group(2).upper()}"
    if not key.isidentifier():
        raise RuleError(f"{where}: tags.{key}: a DICOM keyword (StudyDescription) or a tag (\"0040,1003\")")
    return key


def _strings(raw: Any, where: str) -> list[str]:
    values = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(v, str | int | float) for v in values):
        raise RuleError(f"{where}: a value or a list of values")
    return [str(v) for v in values if str(v) != ""]


def _compile(pattern: str, text: str, where: str) -> Any:
    """RE2, not Python's ``re``: a pattern cannot run away (``^(a+)+$`` on 35 characters froze the whole
    gateway with ``re``); RE2 has no backreferences or lookaround, and says so when a rule uses them."""
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except Exception as exc:  # re2's own error type (bytes message) for any pattern it cannot take
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if len(reason) > 160:  # RE2 repeats the pattern in its reason
            reason = reason[:160] + "..."
        raise RuleError(f"{where}: {quoted(text)} is not a regular expression RE2 accepts: {reason}") from None


def _matches(raw: Any, where: str, fold_case: bool = False) -> tuple[Match, ...]:
    matches = []
    for text in _strings(raw, where):
        if text.startswith("re:"):
            matches.append(Match(text, _compile(text[3:], text, where)))
        else:
            matches.append(Match(text, fold_case=fold_case))
    if not matches:
        raise RuleError(f"{where}: no value")
    return tuple(matches)
