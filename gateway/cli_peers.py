"""``dicomgw peers`` (who may exchange studies, and how) and ``dicomgw route test`` (which rule a file meets).

Peers live in the queue database (audited on every change), beside those listed in ``[xmpp] peers``.
``peers export prosody|ejabberd|ejabberd-roster`` prints the shared roster for central administration, exact per
pair (one group of two per allowed peer, ``gateway.roster``), as a Prosody ``mod_groups`` file, as ``ejabberdctl``
shared roster commands, or as ``ejabberdctl add_rosteritem`` commands (a region on ejabberd: see
``gateway.roster.ejabberd_items_text``); ``--merge FILE...`` joins the exports of a region's gateways into one, so the XMPP
server's operator gives every gateway its roster in one place.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.model import DIRECTIONS
from gateway.roster import roster_name
from gateway.settings import load_settings
from gateway.terminal import cell


def add_parsers(sub: Any, config_option: Any) -> None:
    peers = sub.add_parser("peers", help="which peer gateways may exchange studies with this one, and how")
    config_option(peers)
    peers.add_argument("action", nargs="?", choices=["ls", "list", "add", "edit", "rm", "remove", "export"], default="ls")
    peers.add_argument("jid", nargs="?", help="peer gateway JID per the naming standard, e.g. radiology.hospital-b@helsenett.test;"
                       " with 'export': prosody, ejabberd or ejabberd-roster (roster items: for a region of hundreds)")
    peers.add_argument("--name", help="a display name for people")
    peers.add_argument("--fingerprint", help="the peer's certificate SHA-256 (its `dicomgw keys show`), verified out of band")
    peers.add_argument("--add-fingerprint", metavar="SHA256", help="with 'edit': pin a second certificate (the peer "
                       "rotates its key: its old and new one are both accepted)")
    peers.add_argument("--remove-fingerprint", metavar="SHA256", help="with 'edit': drop a pin (the peer's old "
                       "certificate, once its rotation is over)")
    peers.add_argument("--destinations", help="routing destinations this peer serves besides its own, comma-separated")
    peers.add_argument("--max-concurrent", type=int, help="routine transfers to this peer at once (default 1)")
    peers.add_argument("--directions", choices=DIRECTIONS, help="both (default), send (we only send to it), receive (we only receive)")
    peers.add_argument("--schedule", help="transfer windows for routine studies, e.g. 'mon-fri 18:00-07:00; sat,sun 00:00-24:00'"
                       " ('' = always)")
    peers.add_argument("--group", default="DICOM gateways", help="with 'export': the shared roster groups' name prefix "
                       "(one group per pair: 'NAME: jid1 + jid2')")
    peers.add_argument("--merge", nargs="+", metavar="FILE", help="with 'export': merge the exports of every gateway "
                       "of a region into one (pairs both sides list; one-sided ones are named and left out)")
    peers.add_argument("--all", action="store_true", help="with 'ls': removed peers too")
    peers.add_argument("--json", action="store_true")
    peers.set_defaults(handler=cmd_peers)

    web = sub.add_parser("web", help="the admin web page: make the password hash for [web] auth_password_hash")
    web.add_argument("action", choices=["hash-password"])
    web.add_argument("--password-stdin", action="store_true", help="read the password from standard input (else asked twice)")
    web.set_defaults(handler=cmd_web)

    route = sub.add_parser("route", help="routing rules: which rule a DICOM file meets, and why the others do not")
    config_option(route)
    route.add_argument("action", choices=["test"])
    route.add_argument("file", help="a DICOM Part-10 file")
    route.add_argument("--calling-ae", default="", help="as if it came from this calling AE title")
    route.add_argument("--called-ae", default="", help="as if it was sent to this called AE title")
    route.add_argument("--folder", default="", help="as if dropped in this subfolder of the watched folder")
    route.add_argument("--json", action="store_true")
    route.set_defaults(handler=cmd_route)


def _fail(action: str, text: str, code: int = 2) -> int:
    print(f"dicomgw peers {action}: {text}", file=sys.stderr)
    return code


def cmd_peers(args: argparse.Namespace) -> int:
    from gateway.addressing import AddressError, parse

    if args.action == "export" and args.merge:
        return cmd_merge(args.jid or "", args.merge)
    settings = load_settings(args.config)
    store = _store(settings)
    action = {"list": "ls", "remove": "rm"}.get(args.action, args.action)
    if action == "ls":
        return _list(store, args)
    if action == "export":
        return _export(settings, store, args.jid or "", args.group)
    if not args.jid:
        return _fail(action, "a peer JID is required")
    try:
        bare = parse(args.jid).bare
    except AddressError as exc:
        return _fail(action, str(exc))
    if action == "rm":
        if not store.remove_peer(bare):
            return _fail("rm", f"{bare} is not a known peer", 1)
        print(f"{bare} may no longer exchange studies with this gateway")
        return 0
    try:
        if args.name is not None:
            roster_name(args.name, "--name")
        config = _config(args)
        pin = None
        from gateway.pins import normalize_fingerprint, pin_set

        if args.fingerprint:
            pin = normalize_fingerprint(args.fingerprint)
        if args.add_fingerprint or args.remove_fingerprint:  # a peer rotating its key: two pins for a while
            current = next((p["fingerprint"] for p in store.peers() if p["jid"] == bare), None)
            pins = list(pin_set(pin or current))
            if args.add_fingerprint:
                added = normalize_fingerprint(args.add_fingerprint)
                if added not in pins:
                    pins.append(added)
                if len(pins) > 3:
                    raise ValueError(f"{bare} would have {len(pins)} pins: remove the old one first (--remove-fingerprint)")
            if args.remove_fingerprint:
                removed = normalize_fingerprint(args.remove_fingerprint)
                if removed not in pins:
                    raise ValueError(f"{removed} is not pinned for {bare} (pins: {', '.join(pins) or 'none'})")
                pins.remove(removed)
                if not pins:
                    raise ValueError(f"that is the only pin of {bare}: add its new one first (--add-fingerprint)")
            pin = ",".join(pins)
    except ValueError as exc:
        return _fail(action, str(exc))
    if action == "edit":
        if not store.edit_peer(bare, args.name, pin, **config):
            return _fail("edit", f"{bare} is not a known peer (dicomgw peers add {bare})", 1)
        print(f"{bare} changed")
        return 0
    store.add_peer(bare, args.name or "", pin, **config)
    print(f"{bare} may now exchange studies with this gateway"
          + (f" (certificate pinned: SHA-256 {pin})" if pin else
             "; no certificate pinned yet: nothing is exchanged until `--fingerprint` is given"))
    return 0


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The per-peer settings given on the command line, checked."""
    from gateway.addressing import destination_jid
    from gateway.windows import parse_schedule

    config: dict[str, Any] = {}
    if args.destinations is not None:
        destinations = tuple(d.strip() for d in args.destinations.split(",") if d.strip())
        for destination in destinations:
            destination_jid(destination, "example.org")  # raises AddressError (a ValueError) if malformed
        config["destinations"] = destinations
    if args.max_concurrent is not None:
        if not 1 <= args.max_concurrent <= 64:
            raise ValueError("--max-concurrent: between 1 and 64")
        config["max_concurrent"] = args.max_concurrent
    if args.directions is not None:
        config["directions"] = args.directions
    if args.schedule is not None:
        config["schedule"] = parse_schedule(args.schedule).text
    return config


def _list(store: Any, args: argparse.Namespace) -> int:
    rows = [r for r in store.peers() if r["allowed"] or args.all]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Peers: {sum(r['allowed'] for r in rows)} allowed")
    for column in ("JID", "Name", "Allowed", "Directions", "Max", "Schedule", "Serves", "Pinned certificate SHA-256"):
        table.add_column(column)
    for r in rows:
        table.add_row(*map(cell, (r["jid"], r["name"] or "-", "yes" if r["allowed"] else "removed", r["directions"],
                                  str(r["max_concurrent"]), r["schedule"] or "always", ", ".join(r["destinations"]) or "-",
                                  r["fingerprint"] or "-")))
    Console(width=200).print(table)
    return 0


def roster_members(settings: Any, store: Any) -> dict[str, str]:
    """This gateway and every allowed peer (database and ``[xmpp] peers``): bare JID -> display name."""
    from gateway.addressing import parse

    members: dict[str, str] = {}
    if settings.xmpp.jid:
        own = parse(settings.xmpp.jid)
        members[own.bare] = own.bare
    for jid in settings.xmpp.peers:
        members.setdefault(jid, jid)
    for row in store.peers():
        if row["allowed"]:
            members[row["jid"]] = row["name"] or row["jid"]
    return members


def _export(settings: Any, store: Any, server: str, group: str) -> int:
    """This gateway's pairs (``gateway.roster``): one group per allowed peer, holding the two of them."""
    from gateway.addressing import parse
    from gateway.roster import EXPORT_FORMATS, export_text, pair_groups

    if server not in EXPORT_FORMATS:
        return _fail("export", "say which server: dicomgw peers export prosody|ejabberd|ejabberd-roster")
    if not settings.xmpp.jid:
        return _fail("export", "no JID of this gateway ([xmpp] jid): the roster pairs it with its peers", 1)
    own = parse(settings.xmpp.jid).bare
    try:
        roster_name(group, "--group")
        peers = {jid: roster_name(name, f"the display name of {jid}") for jid, name in roster_members(settings, store).items()
                 if jid != own}
    except ValueError as exc:
        return _fail("export", f"{exc} (fix it with dicomgw peers edit JID --name ...)")
    if not peers:
        return _fail("export", "no peer: nothing to export (dicomgw peers add JID --fingerprint ...)", 1)
    groups = pair_groups(group, own, peers)
    print(export_text(server, groups), end="")
    return 0


def cmd_merge(server: str, files: list[str]) -> int:
    """``peers export prosody|ejabberd|ejabberd-roster --merge FILE...``: the region's roster from every gateway's
    export (an ejabberd export may be either kind: both are read)."""
    from pathlib import Path

    from gateway.roster import (
        EXPORT_FORMATS,
        RosterFileError,
        export_text,
        merge,
        parse_ejabberd,
        parse_prosody,
    )

    if server not in EXPORT_FORMATS:
        return _fail("export", "say which server: dicomgw peers export prosody|ejabberd|ejabberd-roster --merge FILE...")
    exports, seen = [], set()
    try:
        for name in files:
            if Path(name).resolve() in seen:  # the same file twice would make one-sided pairs look agreed
                print(f"dicomgw peers export: {name} was given before: read once", file=sys.stderr)
                continue
            seen.add(Path(name).resolve())
            text = Path(name).read_text(encoding="utf-8")
            exports.append((name, parse_prosody(text, name) if server == "prosody" else parse_ejabberd(text, name)))
        merged = merge(exports)
    except (OSError, UnicodeDecodeError, RosterFileError, ValueError) as exc:
        return _fail("export", str(exc), 1)
    for line in merged.one_sided:
        print(f"dicomgw peers export: left out, one-sided pair {line}", file=sys.stderr)
    print(export_text(server, merged.groups), end="")
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """Print a PBKDF2-SHA256 hash of a password for ``[web] auth_password_hash`` (the password is never stored)."""
    import getpass

    from gateway.passwords import hash_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password for the admin web page: ")
        if getpass.getpass("again: ") != password:
            print("dicomgw web hash-password: the two passwords differ", file=sys.stderr)
            return 2
    if len(password) < 12:
        print("dicomgw web hash-password: use at least 12 characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from gateway.bootstrap import facts_from_file

    settings = load_settings(args.config)
    from gateway.routing import Rules, scp_source

    rules = Rules(settings.routing.rules, settings.routing.default_destination)
    source = (scp_source(args.calling_ae, args.called_ae, "127.0.0.1") if args.calling_ae or args.called_ae
              else f"folder:{args.folder.strip('/')}/file" if args.folder else "")
    try:
        facts = facts_from_file(args.file, source, rules.tag_keys())
    except (OSError, ValueError) as exc:
        print(f"dicomgw route test: {args.file}: {exc}", file=sys.stderr)
        return 2
    verdict = rules.decide(facts)
    if args.json:
        print(json.dumps({"rule": verdict.rule, "destinations": list(verdict.destinations), "priority": verdict.priority,
                          "explanation": list(verdict.explanation), "tags": dict(facts.tags),
                          "modalities": list(facts.modalities), "warnings": rules.warnings()}, indent=2))
        return 0
    for warning in rules.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    for line in verdict.explanation:
        print(line)
    print(f"=> {', '.join(verdict.destinations) or 'no destination'} ({verdict.priority})" if verdict.destinations
          else "=> no destination: the study would stay stable")
    return 0


def _store(settings: Any) -> Any:
    from gateway.store import open_store

    return open_store(settings.queue.db_url)
