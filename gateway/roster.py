"""Shared rosters for the XMPP server, exact per pair: ``dicomgw peers export prosody|ejabberd`` and ``--merge``.

A gateway must see the presence of its peers and of no one else. A server-side group shares every member with
every other member, so one group holding a gateway and all its peers would let A's peers B and C see each other
(they never asked to). The export therefore makes **one group per pair** (this gateway and one peer), named
``"<group>: <jid1> + <jid2>"`` with the two bare JIDs sorted: the same pair exported by either side gives the
same group, so merging the exports of a region is a union.

``merge`` takes the exports of several gateways (all Prosody files, or all ejabberd command lists) and keeps the
pairs that both sides list; a pair only one side lists (B was added at A but A not at B, or B's export was not
given) is left out and named, because B would refuse A's offers anyway and B's operator did not agree to share
presence. Names (display and group) are checked with :func:`roster_name` first: they go into Prosody's
``groups_file`` and ejabberd's commands as they are.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field

_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\[\]=]")


def roster_name(text: str, what: str) -> str:
    """A display or group name that can go into Prosody's groups file and ejabberd's commands as it is: no line
    breaks or other control characters (a newline injected whole sections into the groups file), no ``[``,
    ``]`` or ``=`` (the file's own syntax), at most 100 characters. Raises ValueError naming what is wrong."""
    bad = _NOT_IN_A_NAME.search(text)
    if bad is not None:
        raise ValueError(f"{what} {text[:60]!r} holds {bad.group()!r}: names may not hold line breaks, control "
                         f"characters, '[', ']' or '='")
    if len(text) > 100:
        raise ValueError(f"{what} is {len(text)} characters long (at most 100)")
    return text


@dataclass
class PairGroup:
    """A shared roster group of exactly two gateways."""

    label: str
    members: dict[str, str] = field(default_factory=dict)  # bare JID -> display name

    @property
    def pair(self) -> frozenset[str]:
        return frozenset(self.members)

    @property
    def group_id(self) -> str:
        """ejabberd's group identifier: short, ASCII, the same for the same pair and label."""
        return "dicomgw_" + hashlib.sha256(self.label.encode()).hexdigest()[:12]


def pair_label(group: str, a: str, b: str) -> str:
    first, second = sorted((a, b))
    return f"{group}: {first} + {second}"


def pair_groups(group: str, own: str, peers: dict[str, str]) -> list[PairGroup]:
    """One group per peer: this gateway (``own``, its bare JID) and the peer."""
    return [PairGroup(pair_label(group, own, jid), {own: own, jid: name}) for jid, name in sorted(peers.items()) if jid != own]


def prosody_text(groups: list[PairGroup]) -> str:
    """A ``groups_file`` for Prosody's mod_groups: ``[label]`` then ``jid=display name`` per member."""
    lines: list[str] = []
    for g in sorted(groups, key=lambda g: g.label):
        lines += [f"[{g.label}]"] + [f"{jid}={name}" for jid, name in sorted(g.members.items())]
    return "\n".join(lines) + "\n" if lines else ""


def ejabberd_text(groups: list[PairGroup]) -> str:
    """``ejabberdctl`` commands, per group: srg_create (ejabberd 23: group host label description displayed-
    groups: itself, so its members see each other) and srg_user_add per member."""
    lines: list[str] = []
    for g in sorted(groups, key=lambda g: g.label):
        host = sorted(g.members)[0].split("@", 1)[1]
        lines.append(f"ejabberdctl srg_create {g.group_id} {host} {_quote(g.label)} {_quote('dicomgw peers export')} "
                     f"{g.group_id}")
        for jid in sorted(g.members):
            user, member_host = jid.split("@", 1)
            lines.append(f"ejabberdctl srg_user_add {user} {member_host} {g.group_id} {host}")
    return "\n".join(lines) + "\n" if lines else ""


def ejabberd_items_text(groups: list[PairGroup]) -> str:
    """The same pairs as roster items of each user (``ejabberdctl add_rosteritem``, mod_admin_extra), both ways with
    subscription ``both``. For a region on ejabberd: mod_shared_roster looks through every group at each login, so with
    one group per pair a login costs O(pairs in the region) (bench/region: the login storm of 200 sites took 14.5 s
    with groups, 3.2 s with items); items cost a login its own peers only."""
    lines: list[str] = []
    for g in sorted(groups, key=lambda g: g.label):
        for own in sorted(g.members):
            for other in sorted(g.members):
                if other != own:
                    user, host = own.split("@", 1)
                    peer_user, peer_host = other.split("@", 1)
                    lines.append(f"ejabberdctl add_rosteritem {user} {host} {peer_user} {peer_host} "
                                 f"{_quote(g.members[other])} {_quote(g.label)} both")
    return "\n".join(lines) + "\n" if lines else ""


def export_text(server: str, groups: list[PairGroup]) -> str:
    """``peers export SERVER``: prosody (a mod_groups file), ejabberd (shared roster groups), ejabberd-roster (items)."""
    return {"prosody": prosody_text, "ejabberd": ejabberd_text, "ejabberd-roster": ejabberd_items_text}[server](groups)


EXPORT_FORMATS = ("prosody", "ejabberd", "ejabberd-roster")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class RosterFileError(ValueError):
    """An export that cannot be read back (named with the file and line)."""


def parse_prosody(text: str, where: str) -> list[PairGroup]:
    groups: list[PairGroup] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            groups.append(PairGroup(roster_name(line[1:-1], f"{where}:{number}: group")))
        elif "=" in line and groups:
            jid, _, name = line.partition("=")
            groups[-1].members[_jid(jid.strip(), f"{where}:{number}")] = roster_name(name.strip(), f"{where}:{number}: name")
        else:
            raise RosterFileError(f"{where}:{number}: not a Prosody groups line: {line[:80]!r}")
    return groups


def parse_ejabberd(text: str, where: str) -> list[PairGroup]:
    groups: dict[str, PairGroup] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise RosterFileError(f"{where}:{number}: {exc}") from None
        if len(argv) == 7 and argv[:2] == ["ejabberdctl", "srg_create"]:
            groups[argv[2]] = PairGroup(roster_name(argv[4], f"{where}:{number}: label"))
        elif len(argv) == 6 and argv[:2] == ["ejabberdctl", "srg_user_add"] and argv[4] in groups:
            jid = _jid(f"{argv[2]}@{argv[3]}", f"{where}:{number}")
            groups[argv[4]].members[jid] = jid
        elif len(argv) == 9 and argv[:2] == ["ejabberdctl", "add_rosteritem"] and argv[8] == "both":
            own = _jid(f"{argv[2]}@{argv[3]}", f"{where}:{number}")
            other = _jid(f"{argv[4]}@{argv[5]}", f"{where}:{number}")
            label = roster_name(argv[7], f"{where}:{number}: group")
            group = groups.setdefault(f"items:{label}", PairGroup(label))
            group.members.setdefault(own, own)
            group.members[other] = roster_name(argv[6], f"{where}:{number}: name")
        else:
            raise RosterFileError(f"{where}:{number}: not an export line (srg_create / srg_user_add / add_rosteritem): "
                                  f"{line[:80]!r}")
    return list(groups.values())


def _jid(text: str, where: str) -> str:
    from gateway.addressing import AddressError, parse

    try:
        return parse(text).bare
    except AddressError as exc:
        raise RosterFileError(f"{where}: {exc}") from None


@dataclass
class Merged:
    groups: list[PairGroup]
    one_sided: list[str]  # "A lists B, but no other export lists A"


def merge(exports: list[tuple[str, list[PairGroup]]]) -> Merged:
    """The pairs that two different exports list (see the module docstring); names: a display name someone
    gave (not the bare JID) wins over the JID; among several, the first in sorted order."""
    seen: dict[frozenset[str], list[str]] = {}
    labels: dict[frozenset[str], str] = {}
    names: dict[str, set[str]] = {}
    for where, groups in exports:
        for g in groups:
            if len(g.members) != 2:
                raise RosterFileError(f"{where}: group {g.label!r} has {len(g.members)} member(s): an export of this "
                                      f"version has pairs only (make it again with `dicomgw peers export`)")
            if where not in seen.setdefault(g.pair, []):
                seen[g.pair].append(where)
            labels.setdefault(g.pair, g.label)
            for jid, name in g.members.items():
                names.setdefault(jid, set()).add(name)
    kept, one_sided = [], []
    for pair, sources in sorted(seen.items(), key=lambda item: sorted(item[0])):
        if len(sources) < 2:
            a, b = sorted(pair)
            one_sided.append(f"{a} + {b}: only in {sources[0]} (the other gateway's export does not list it)")
            continue
        members = {jid: min(names[jid] - {jid}, default=jid) for jid in pair}
        kept.append(PairGroup(labels[pair], members))
    return Merged(kept, one_sided)
