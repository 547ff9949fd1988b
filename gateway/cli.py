"""The ``dicomgw`` command line: run the gateway, look at the queue, echo a DICOM peer.

    dicomgw run [--config FILE]
    dicomgw queue [--state STATE] [--json] [--config FILE]
    dicomgw queue show STUDY_UID [--json] [--config FILE]
    dicomgw peers [list|add JID [--fingerprint SHA256]|remove JID] [--json]
    dicomgw keys [show|init] [--json]
    dicomgw status [--json]
    dicomgw queue retry UNIT_ID|STUDY_UID
    dicomgw audit [--transfers] [--limit N] [--json]
    dicomgw echo AE@HOST:PORT [--calling-ae AE]
    dicomgw demo [--json]

The config defaults to ``$DICOMGW_CONFIG`` or ``conf/gateway.toml``. Exit codes: 0 ok, 1 the thing asked
for failed or was not found, 2 bad usage or bad configuration, 3 the queue database cannot be reached or used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.dashboard import AWAITING_VERDICT, awaiting_verdict
from gateway.lifecycle import State
from gateway.model import InstanceRecord, StudySummary
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store import QueueStore, utcnow
from gateway.terminal import cell, markup, plain


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from gateway.outage import UNREACHABLE

    try:
        return int(args.handler(args))
    except SettingsError as exc:
        print(f"dicomgw: configuration error: {exc}", file=sys.stderr)
        return 2
    except UNREACHABLE as exc:  # a server down, a file it may not open: one line, no traceback
        if args.command == "run":  # in the log's own format (json under systemd), which is set up by then
            logging.getLogger("gateway").critical("not started: %s", _database_error(args, exc))
        else:
            print(f"dicomgw: {_database_error(args, exc)}", file=sys.stderr)
        return 3


def _database_error(args: argparse.Namespace, exc: Exception) -> str:
    """What an unreachable or unusable queue database says, with its URL (the password hidden)."""
    from sqlalchemy import make_url

    try:
        url = make_url(load_settings(args.config).queue.db_url).render_as_string(hide_password=True)
    except Exception:
        url = "queue.db_url"
    from gateway.outage import reason

    detail = reason(exc, 401)
    return f"the queue database {plain(url)} cannot be used: {detail[:400]}{'...' if len(detail) > 400 else ''}"


def _bounded(low: int, high: int) -> Any:
    """An argparse type: a whole number from ``low`` to ``high``, else a usage error that says so (not a
    traceback from deep inside, for a count of 10^20)."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{plain(text)[:40]!r}: a whole number from {low} to {high}")
        return int(text)

    return parse


_count = _bounded(1, 1_000_000)


def _uid_text(text: str) -> str:
    """A UID as typed, for a message: one line, and cut if longer than any UID (64 characters)."""
    text = plain(text)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def _unit_id(text: str) -> int | None:
    """``text`` as a unit id (ASCII digits, a database integer), else None (then it is a Study Instance UID)."""
    return int(text) if text.isascii() and text.isdigit() and int(text) < 2**63 else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomgw", description="DICOM modality integration gateway",
        epilog="Environment: DICOMGW_CONFIG (the settings file when --config is not given; else conf/gateway.toml), "
               "DICOMGW_LOG_LEVEL (run's --log-level). --config may come before or after the command. "
               "Step by step: docs/deploy.md.")
    parser.add_argument("--config", default=os.environ.get("DICOMGW_CONFIG", "conf/gateway.toml"), help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the gateway (SCP, watched folder, queue)")
    _config_option(run)
    run.add_argument("--log-level", default=os.environ.get("DICOMGW_LOG_LEVEL", "INFO"))
    run.add_argument("--log-format", choices=["text", "json"], help="text (default, or [log] format) or json: one object per line")
    run.set_defaults(handler=_cmd_run)

    queue = sub.add_parser("queue", help="list the queue, or show one study")
    _config_option(queue)
    queue.add_argument("action", nargs="?", choices=["show", "retry", "release", "drop"],
                       help="show one study; retry a failed or dead unit; release or drop a held one (a discontinued MPPS)")
    queue.add_argument("study_uid", nargs="?", help="Study Instance UID (with 'show'); unit id or Study Instance UID (with 'retry')")
    queue.add_argument("--state", choices=[s.value for s in State], help="only studies in this state")
    queue.add_argument("--limit", type=_count, default=50, help="units per page (default 50): live units first, then "
                       "delivered ones, newest first")
    queue.add_argument("--page", type=_count, default=1, help="which page (from 1)")
    queue.add_argument("--all", action="store_true", help="every unit, history included, no paging")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.set_defaults(handler=_cmd_queue)

    from gateway.cli_peers import add_parsers

    add_parsers(sub, _config_option)

    keys = sub.add_parser("keys", help="this gateway's end-to-end identity (key and self-signed certificate)")
    _config_option(keys)
    keys.add_argument("action", nargs="?", choices=["show", "init", "rotate"], default="show",
                      help="show (default); init: make the identity if there is none; rotate: a new key, the old one "
                           "still served to peers that pin it for --overlap")
    keys.add_argument("--overlap", default="7d", help="with 'rotate': how long the old key stays usable (e.g. 7d, 48h; "
                      "peers add the new pin meanwhile: dicomgw peers edit JID --add-fingerprint NEW)")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(handler=_cmd_keys)

    status = sub.add_parser("status", help="is the gateway running: each process (heartbeat), its listeners, watcher and XMPP connection; exit 1 if not")
    _config_option(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_cmd_status)

    audit = sub.add_parser("audit", help="the audit log: state moves, refusals, quarantines, transfers")
    _config_option(audit)
    audit.add_argument("--limit", type=_count, default=50, help="the newest so many (default 50)")
    audit.add_argument("--transfers", action="store_true", help="the transfer attempts instead")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(handler=_cmd_audit)

    maint = sub.add_parser("maintenance", help="take this gateway out of the exchange for a while (peers hold their sends)")
    maint.add_argument("action", nargs="?", choices=["on", "off"], help="no action: show the state")
    maint.add_argument("--message", default="", help="what peers see, e.g. 'PACS upgrade until 14:00'")
    _config_option(maint)
    maint.set_defaults(handler=_cmd_maintenance)

    stats = sub.add_parser("stats", help="transfer metrics as the field study defined them: T, N, S, F, MTBF, MB/s")
    _config_option(stats)
    stats.add_argument("--since", help="only attempts from then on: an ISO date/time (UTC) or an age like 24h, 7d, 30m")
    stats.add_argument("--peer", help="only attempts with this peer (bare JID)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=_cmd_stats)

    demo = sub.add_parser("demo", help="run the chain on this machine with embedded defaults and show it")
    demo.add_argument("--json", action="store_true", help="end with one JSON line")
    demo.add_argument("--builtin-pacs", action="store_true", help="use the built-in storage SCP as B's PACS even if Orthanc is installed")
    demo.set_defaults(handler=_cmd_demo)

    testdata = sub.add_parser("testdata", help="write a synthetic CT study (no patient data) to try the chain with")
    testdata.add_argument("out_dir", help="directory for the Part-10 files (made if missing)")
    testdata.add_argument("--series", type=_bounded(1, 100), default=1)
    testdata.add_argument("--slices", type=_bounded(1, 10_000), default=20, help="instances per series")
    testdata.add_argument("--size", type=_bounded(8, 4096), default=256, help="rows and columns of each slice")
    testdata.add_argument("--description", default="CT TEST STUDY", help="Study Description (e.g. 'CT TRAUMA HEAD' for a STAT rule)")
    testdata.set_defaults(handler=_cmd_testdata)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer: AE@HOST:PORT")
    echo.add_argument("target", help="called AE title, host and port, e.g. ORTHANC@127.0.0.1:4242")
    _config_option(echo)
    echo.add_argument("--calling-ae", help="calling AE title (default: the config's ae_title, else DICOMGW)")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.set_defaults(handler=_cmd_echo)
    return parser


CONFIG_HELP = "TOML settings file (default: $DICOMGW_CONFIG, else conf/gateway.toml)"


def _config_option(parser: argparse.ArgumentParser) -> None:
    """``--config`` after the subcommand too (``dicomgw queue --config X``); SUPPRESS keeps the value given
    before it (``dicomgw --config X queue``) when none is given after."""
    parser.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)


# -- maintenance ----------------------------------------------------------------------------------
def _cmd_maintenance(args: argparse.Namespace) -> int:
    from gateway.maintenance import MAX_MESSAGE, maintenance, set_maintenance

    message = plain(args.message).strip()
    if len(message) > MAX_MESSAGE:  # peers see it in their presence: as long as a server announcement's, at most
        print(f"dicomgw maintenance: --message of {len(message)} characters: at most {MAX_MESSAGE}", file=sys.stderr)
        return 2
    store = _store(load_settings(args.config))
    if args.action is not None:
        set_maintenance(store, args.action == "on", message, who=f"{os.environ.get('USER', 'admin')} via dicomgw")
    state = maintenance(store)
    print(f"maintenance {'on since ' + state.since if state.on else 'off'}" + (f": {plain(state.message)}" if state.message else "")
          + ("; peers see dnd and hold their sends" if state.on else ""))
    return 0


# -- stats ----------------------------------------------------------------------------------------
def _duration_s(text: str) -> float | None:
    """Seconds of a duration like 30m, 24h, 7d (or 90s); None when ``text`` is not one."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if text[-1:] in units and text[:-1].isascii() and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * units[text[-1]]
    return None


MAX_AGE_S = 100 * 365 * 86400  # --since: a century back is every row there is


def _since(text: str | None) -> datetime | None:
    """An ISO date/time (UTC) or an age: 30m, 24h, 7d."""
    if not text:
        return None
    age = _duration_s(text)
    if age is not None:
        if age > MAX_AGE_S:
            raise ValueError(f"--since {plain(text)[:40]!r}: at most {MAX_AGE_S // 86400}d back")
        return utcnow() - timedelta(seconds=age)
    try:
        return datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError as exc:
        raise ValueError(f"--since {plain(text)[:40]!r}: give an ISO date/time (UTC) or an age like 24h, 7d, 30m") from exc


def _cmd_stats(args: argparse.Namespace) -> int:
    from gateway.stats import attempts, summary

    try:
        since = _since(args.since)
    except ValueError as exc:
        print(f"dicomgw stats: {exc}", file=sys.stderr)
        return 2
    store = _store(load_settings(args.config))
    figures = summary(attempts(store.engine, since, args.peer))
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    rate = f"{figures['success_rate']:.2%}" if figures["success_rate"] is not None else "-"
    mtbf = f"{figures['mtbf_s']:,.0f} s" if figures["mtbf_s"] is not None else "- (no failure)"
    rows = [("T", "time with active transfers", f"{figures['T_s']:,.0f} s"), ("N", "attempted transfers", figures["N"]),
            ("S", "successful transfers", figures["S"]), ("F", "failed transfers during T", figures["F"]),
            ("S/N", "success rate", rate), ("MTBF", "T / F", mtbf)]
    print(f"{'Variable':<9}{'Description':<30}Value")
    for name, text, value in rows:
        print(f"{name:<9}{text:<30}{value}")
    if figures["failures"]:
        print("failures: " + ", ".join(f"{k} {v}" for k, v in figures["failures"].items()))
    for title, key in (("method", "by_method"), ("size", "by_size")):
        for label, row in figures[key].items():  # type: ignore[union-attr]
            ratio = f"{row['compression']:.2f}x" if row.get("compression") else "-"
            print(f"{title} {label:<16}{row['transfers']:>6} transfers {row['mb']:>12,.1f} MB {row['mb_s']:>9.2f} MB/s"
                  f"  wire {row['wire_mb']:>10,.1f} MB (compression {ratio})")
    return 0


# -- run ------------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    from gateway.logs import configure

    configure(args.log_level, args.log_format or settings.log_format)
    # pynetdicom logs every request at INFO: one line per instance is noise for an admin.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    from gateway.bootstrap import NotStarted, run_forever

    try:
        run_forever(settings)
    except NotStarted as exc:  # the reason in the log's format (journald, json), not a traceback
        logging.getLogger("gateway").critical("not started: %s", exc)
        return 1
    return 0


# -- peers and audit ------------------------------------------------------------------------------
def _cmd_keys(args: argparse.Namespace) -> int:
    """``init`` makes the identity if there is none (never replaces one); ``show`` prints its fingerprint."""
    from gateway.bootstrap import identity_paths, load_identity
    from gateway.pins import grouped

    settings = load_settings(args.config)
    key_path, cert_path = identity_paths(settings)
    if args.action == "rotate":
        return _rotate_keys(settings, args)
    if args.action == "show" and not key_path.exists():
        print(f"dicomgw keys: no identity yet at {key_path}; make one with `dicomgw keys init`", file=sys.stderr)
        return 1
    try:
        identity, created = load_identity(settings)
    except (OSError, ValueError) as exc:
        print(f"dicomgw keys: {exc}", file=sys.stderr)
        return 1
    from gateway.bootstrap import load_all_identities

    identities, _created, retired = load_all_identities(settings)
    if retired is not None:
        _store(settings).audit("identity_retired", f"the previous end-to-end certificate SHA-256 {retired} is retired: "
                               f"its overlap ended")
    previous = identities.previous
    # While the overlap lasts: the peers that still pin only the previous certificate (as their last completed
    # exchange with us showed), so the operator knows whom to ask before it ends.
    behind = _store(settings).peers_pinning(previous.fingerprint) if previous is not None else []
    if args.json:
        print(json.dumps({"fingerprint": identity.fingerprint, "certificate": str(cert_path), "key": str(key_path),
                          "created": created, "previous_fingerprint": previous.fingerprint if previous else None,
                          "previous_until": identities.previous_until.isoformat() if identities.previous_until else None,
                          "peers_pinning_previous": [{"jid": jid, "since": at.isoformat()} for jid, at in behind]}))
        return 0
    print(f"{'created' if created else 'identity'}: {cert_path} (key {key_path}, mode 600)")
    print(f"SHA-256 {identity.fingerprint}")
    print(f"        {grouped(identity.fingerprint)}")
    if previous is not None:
        print(f"previous SHA-256 {previous.fingerprint}: still served to peers that pin it until "
              f"{identities.previous_until:%Y-%m-%d %H:%M} UTC")
        for jid, at in behind:
            print(f"  {plain(jid)} pins only the previous certificate (its last exchange, {at:%Y-%m-%d %H:%M} UTC): "
                  f"its operator adds the new pin with `dicomgw peers edit OUR_JID --add-fingerprint SHA256`")
        if not behind:
            print("  no peer's last exchange pinned only the previous certificate")
    print("Read it to the peer's operator; they pin it with `dicomgw peers add YOUR_JID --fingerprint SHA256`.")
    return 0


def _rotate_keys(settings: Settings, args: argparse.Namespace) -> int:
    """`dicomgw keys rotate --overlap 7d`: audited; the running gateway takes it over within a second."""
    from gateway.bootstrap import rotate_keys
    from gateway.pins import grouped

    overlap_s = _duration_s(args.overlap)
    if overlap_s is None or not 0 < overlap_s <= 366 * 86400:
        print(f"dicomgw keys rotate: --overlap {args.overlap!r}: a duration like 7d, 48h or 90m (at most a year)",
              file=sys.stderr)
        return 2
    try:
        identities, old = rotate_keys(settings, overlap_s)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"dicomgw keys rotate: {exc}", file=sys.stderr)
        return 1
    new = identities.current.fingerprint
    until = f"{identities.previous_until:%Y-%m-%d %H:%M} UTC"
    _store(settings).audit("identity_rotated", f"new end-to-end certificate SHA-256 {new}; the previous one, {old}, "
                           f"stays usable until {until} for peers that still pin it")
    if args.json:
        print(json.dumps({"fingerprint": new, "previous_fingerprint": old, "previous_until": identities.previous_until.isoformat()}))
        return 0
    print(f"new identity: SHA-256 {new}")
    print(f"              {grouped(new)}")
    print(f"the previous one ({old}) is still served to peers that pin it until {until}.")
    print("Each peer's operator adds the new pin now and drops the old one when it is over:")
    print(f"  dicomgw peers edit YOUR_JID --add-fingerprint {new}")
    print(f"  dicomgw peers edit YOUR_JID --remove-fingerprint {old}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Each gateway process by its heartbeat (``gateway.processes``): running or not, its listeners, its XMPP
    connection. Exit 0 only when a process runs, its watcher runs, and XMPP (when configured) is online."""
    from gateway.processes import overall

    settings = load_settings(args.config)
    store = _store(settings)
    found = overall(store, utcnow())
    live = [p for p in found.processes if p.running]
    xmpp_wanted = settings.xmpp.enabled or any(p.xmpp for p in live)
    watchers = [p.listeners.get("watcher") for p in live if isinstance(p.listeners.get("watcher"), dict)]
    watcher_ok = all(bool(w.get("running")) for w in watchers)
    database = _queue_database(store)
    ok = bool(live) and watcher_ok and (found.xmpp_online or not xmpp_wanted) and database["writable"] is not False
    spool = _spool_space(settings)
    if args.json:
        status = {**{k: found.xmpp.get(k) for k in ("state", "jid", "server", "tls", "tls_version",
                                                     "server_cert_sha256", "last_error")},
                  "running": found.running, "xmpp_configured": xmpp_wanted, "ok": ok,
                  "last_heartbeat_at": found.last_heartbeat_at.isoformat(timespec="seconds") if found.last_heartbeat_at else None,
                  "watcher": watchers[0] if watchers else None, "spool": spool, "queue_database": database,
                  "processes": [p.as_json() for p in found.processes]}
        if not found.running:
            status["state"] = "silent" if found.silent else "not running"
        elif not xmpp_wanted:
            status["state"] = "not configured"
        print(json.dumps(status, indent=2))
        return 0 if ok else 1
    if not found.processes:
        print("gateway: not running (no process has ever reported: start it with `dicomgw run`)")
        return 1
    said = "running" if found.running else ("SILENT (running, but writing no heartbeat)" if found.silent else "NOT RUNNING")
    print(f"{'gateway':>20}: {said} ({len(live)} of {len(found.processes)} known process(es) running)")
    for p in found.processes[:10]:
        print(f"{'process':>20}: {plain(p.owner)}: {plain(p.summary)}")
        if not p.running:
            continue
        for name in ("dicom", "dicom_tls", "web"):
            if p.listeners.get(name):
                print(f"{name:>20}: listening on {plain(p.listeners[name])}")
        watcher = p.listeners.get("watcher")
        if isinstance(watcher, dict):
            print(f"{'watcher':>20}: {'running' if watcher.get('running') else 'NOT RUNNING'} "
                  f"({plain(watcher.get('watch_dir'))}); last error: {plain(watcher.get('last_error') or '-')}")
    print(f"{'spool':>20}: {_spool_text(spool)}")
    print(f"{'queue database':>20}: {plain(database['said'])}")
    if xmpp_wanted:
        xmpp = found.xmpp if found.running else {"state": "not running"}
        for key in ("state", "jid", "server", "tls", "tls_version", "server_cert_sha256", "last_error"):
            print(f"{'xmpp ' + key:>20}: {plain(xmpp.get(key)) if xmpp.get(key) not in (None, '') else '-'}")
    else:
        print(f"{'xmpp':>20}: not configured (no [xmpp] jid)")
    return 0 if ok else 1


def _spool_space(settings: Settings) -> dict[str, Any]:
    """The spool's free space against ``[paths] spool_reserve_mb`` (read here: `status` runs on the gateway's host)."""
    from gateway.dashboard import spool_room

    found: dict[str, Any] = {"dir": str(settings.paths.spool_dir), "reserve_bytes": settings.paths.spool_reserve_bytes}
    try:
        free = shutil.disk_usage(settings.paths.spool_dir).free
    except OSError as exc:
        found["error"] = exc.strerror or type(exc).__name__
        return found
    return {**found, **spool_room(free, settings.paths.spool_reserve_bytes)}


QUEUE_DB_FULL_BYTES = 1 << 20  # below this free, SQLite cannot grow its write-ahead log by much: nothing is recorded
QUEUE_DB_LOW_BYTES = 64 << 20


def _queue_database(store: QueueStore) -> dict[str, Any]:
    """Whether the queue database takes writes, asked without writing: for SQLite the free space of its file
    system (`status` runs on the gateway's host), for PostgreSQL whether a new session would be read-only (a
    standby after a failover, or ``default_transaction_read_only``). ``writable`` is None when it cannot be
    told. A full or read-only database answers every read, so nothing else in `status` would show it."""
    from sqlalchemy import text

    url = store.engine.url
    found: dict[str, Any] = {"url": url.render_as_string(hide_password=True), "writable": None}
    if url.get_backend_name() == "sqlite":
        where = Path(url.database or ".").resolve().parent
        try:
            free = shutil.disk_usage(where).free
        except OSError as exc:
            return {**found, "said": f"SQLite on {where}: free space cannot be read ({exc.strerror})"}
        found.update(free_bytes=free, writable=free >= QUEUE_DB_FULL_BYTES)
        room = f"SQLite, {free / 1e6:,.0f} MB free on {where}"
        if free < QUEUE_DB_FULL_BYTES:
            return {**found, "said": f"{room}: FULL: nothing can be recorded; every instance is refused (A700)"}
        return {**found, "said": room + ("; LOW: every instance is refused (A700) once it is full"
                                         if free < QUEUE_DB_LOW_BYTES else "")}
    with store.engine.connect() as connection:
        read_only = connection.execute(text("SHOW transaction_read_only")).scalar() == "on"
        standby = bool(connection.execute(text("SELECT pg_is_in_recovery()")).scalar())
    found.update(writable=not read_only, read_only=read_only, standby=standby)
    if read_only:
        why = "a standby (in recovery)" if standby else "default_transaction_read_only is on"
        return {**found, "said": f"PostgreSQL at {url.host}: READ-ONLY ({why}): nothing can be recorded; every "
                                 "instance is refused (A700)"}
    return {**found, "said": f"PostgreSQL at {url.host}: takes writes"}


def _spool_text(spool: dict[str, Any]) -> str:
    if "error" in spool:
        return f"{plain(spool['dir'])}: free space cannot be read ({plain(spool['error'])})"
    text = (f"{spool['free']} MB free on {plain(spool['dir'])} "
            f"({spool['reserve']} MB kept for this site's modalities)")
    return text + ("; LOW: peers' studies are refused until there is room" if spool["low"] else "")


def _cmd_audit(args: argparse.Namespace) -> int:
    store = _store(load_settings(args.config))
    rows = store.transfers(last=args.limit) if args.transfers else store.audit_entries(limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="Transfer attempts" if args.transfers else "Audit log (newest first)")
    columns = (
        ("started_at", "direction", "peer_jid", "method", "offset_bytes", "bytes", "outcome", "error", "sid")
        if args.transfers
        else ("at", "event", "study_instance_uid", "from_state", "to_state", "detail")
    )
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(*[cell(_clipped(str(r.get(c) if r.get(c) is not None else "-")), overflow="fold") for c in columns])
    _console().print(table)
    return 0


AUDIT_CELL_CHARS = 1000  # a detail is shown whole up to this (a pin change names two 64-character fingerprints)


def _clipped(text: str) -> str:
    """A table cell's text, cut only past ``AUDIT_CELL_CHARS`` and then saying so (``--json`` has it whole)."""
    if len(text) <= AUDIT_CELL_CHARS:
        return text
    return f"{text[:AUDIT_CELL_CHARS]} ... ({len(text) - AUDIT_CELL_CHARS} more characters: --json has them)"


# -- demo ---------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from adapters.lab.demo import run_demo  # the lab, not the running gateway

    result = run_demo(as_json=args.json, builtin_pacs=args.builtin_pacs)
    if result["xmpp"]:
        return 0 if result["delivered"] and result["instances_in_pacs"] == result["instances_sent"] else 1
    return 0 if result["instances_queued"] == result["instances_sent"] else 1


# -- testdata -------------------------------------------------------------------------------------
def _cmd_testdata(args: argparse.Namespace) -> int:
    """A synthetic study (pure Python: no numpy needed) to send with storescu or drop in the watched folder."""
    from pathlib import Path

    from adapters.lab.synthetic import generate_ct_study

    if not (1 <= args.series <= 50 and 1 <= args.slices <= 2000 and 8 <= args.size <= 1024):
        print("dicomgw testdata: --series 1..50, --slices 1..2000, --size 8..1024", file=sys.stderr)
        return 2
    study = generate_ct_study(Path(args.out_dir), series=args.series, slices_per_series=args.slices, rows=args.size,
                              columns=args.size, study_description=args.description)
    print(f"{len(study.files)} instance(s) of study {study.study_instance_uid} in {args.out_dir}")
    print(f"send it: storescu -aet MODALITY -aec YOUR_AE 127.0.0.1 11112 {args.out_dir.rstrip('/')}/*.dcm "
          f"(or copy the files into the watched folder)")
    return 0


# -- echo -----------------------------------------------------------------------------------------
def _echo_target(target: str, calling_ae: str) -> tuple[str, str, int]:
    """(called AE, host, port) of ``AE@HOST:PORT`` (an IPv6 host in brackets); ValueError saying what is wrong."""
    from gateway.settings import AE_TITLE_RE

    called, at, rest = target.partition("@")
    host, colon, port_text = rest.rpartition(":")
    if not at or not colon or not host:
        raise ValueError(f"expected AE@HOST:PORT, got {plain(target)[:80]!r}")
    for ae, what in ((called, "called AE title"), (calling_ae, "calling AE title")):
        if not AE_TITLE_RE.match(ae.strip()):
            raise ValueError(f"{what} {plain(ae)[:40]!r}: 1-16 printable characters, no backslash")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {plain(port_text)[:20]!r}: a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return called.strip(), host, int(port_text)


def _cmd_echo(args: argparse.Namespace) -> int:
    calling_ae = args.calling_ae
    if not calling_ae:
        calling_ae = load_settings(args.config).dicom.ae_title if os.path.exists(args.config) else "DICOMGW"
    try:
        called, host, port = _echo_target(args.target, calling_ae)
        if not 0.1 <= args.timeout <= 600:  # also nan
            raise ValueError(f"--timeout {args.timeout:g}: from 0.1 to 600 seconds")
    except ValueError as exc:
        print(f"dicomgw echo: {exc}", file=sys.stderr)
        return 2
    from gateway.bootstrap import echo

    result = echo(called, host, port, calling_ae=calling_ae.strip(), timeout_s=args.timeout)
    print(result.detail)
    return 0 if result.ok else 1


# -- queue ----------------------------------------------------------------------------------------
def _cmd_queue(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store = _store(settings)
    if args.action == "show":
        if not args.study_uid:
            print("dicomgw queue show: a Study Instance UID is required", file=sys.stderr)
            return 2
        units = store.study_units(args.study_uid)
        if not units:
            print(f"dicomgw queue show: no study {_uid_text(args.study_uid)} in the queue", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(_study_json(args.study_uid, units), indent=2))
        else:
            _print_study(args.study_uid, units)
        return 0
    if args.action == "retry":
        return _retry(store, args.study_uid or "")
    if args.action in ("release", "drop"):
        return _release_or_drop(store, args.action, args.study_uid or "")
    limit = 10**9 if args.all else args.limit
    studies, live, history = store.queue_page(limit, 1 if args.all else args.page, args.state)
    if args.json:
        print(json.dumps([_summary_json(s) for s in studies], indent=2))
    else:
        _print_queue(studies, args.state, (1 if args.all else args.page, limit, live, history))
    return 0


def _retry(store: Any, target: str) -> int:
    """``dicomgw queue retry UNIT_ID|STUDY_UID``: a failed or dead unit goes back (every such unit of the study)."""
    from gateway.lifecycle import IllegalTransition

    if not target:
        print("dicomgw queue retry: a unit id or a Study Instance UID is required (see `dicomgw queue`)", file=sys.stderr)
        return 2
    unit_id = _unit_id(target)
    if unit_id is not None:
        unit_ids = [unit_id]
    else:
        unit_ids = [unit.unit_id for unit, _rows in store.study_units(target) if unit.state in ("failed", "dead")]
        if not unit_ids:
            print(f"dicomgw queue retry: study {_uid_text(target)} has no failed or dead unit", file=sys.stderr)
            return 1
    who = f"{os.environ.get('USER', 'admin')} via dicomgw queue retry"
    for unit_id in unit_ids:
        try:
            state = store.retry_unit(unit_id, who=who)
        except KeyError:
            print(f"dicomgw queue retry: no unit {unit_id}", file=sys.stderr)
            return 1
        except IllegalTransition as exc:
            print(f"dicomgw queue retry: unit {unit_id} cannot be retried ({exc}); only failed and dead units can",
                  file=sys.stderr)
            return 1
        print(f"unit {unit_id} is {state} again; the running gateway picks it up")
    return 0


def _release_or_drop(store: Any, action: str, target: str) -> int:
    """``queue release|drop UNIT_ID|STUDY_UID``: a held unit (its MPPS was discontinued) goes on now (``release``:
    stable, then routed) or stops for good (``drop``: ``failed``, its files kept); audited with who did it."""
    from gateway.lifecycle import State

    if not target:
        print(f"dicomgw queue {action}: a unit id or a Study Instance UID is required", file=sys.stderr)
        return 2
    try:
        unit_id = _unit_id(target)
        units = [store.unit(unit_id)] if unit_id is not None else [u for u, _rows in store.study_units(target)]
    except KeyError:
        units = []
    held = [u for u in units if "held" in u.flags.split(",")]
    if not held:
        print(f"dicomgw queue {action}: {_uid_text(target)} has no held unit", file=sys.stderr)
        return 1
    who = f"{os.environ.get('USER', 'admin')} via dicomgw queue {action}"
    for unit in held:
        if action == "release" and unit.origin_peer:  # from a peer: imported now (its mapping was added)
            store.release_hold(unit.unit_id, who)
            print(f"unit {unit.unit_id} released: the running gateway imports it into the PACS")
        elif action == "release":
            store.make_stable([unit.unit_id], f"released by {who}")
            print(f"unit {unit.unit_id} released: stable, the running gateway sends it")
        else:
            store.transition(unit.unit_id, State.FAILED, f"dropped by {who}", "dropped by an admin (held: MPPS discontinued)",
                             flags=",".join(f for f in unit.flags.split(",") if f and f != "held"))
            print(f"unit {unit.unit_id} dropped: failed, its files kept (dicomgw queue retry {unit.unit_id} undoes it)")
    return 0


def _store(settings: Settings) -> Any:
    from gateway.store import open_store

    return open_store(settings.queue.db_url)


def _age_s(since: datetime) -> float:
    return max(0.0, (utcnow() - since).total_seconds())


def _summary_json(s: StudySummary) -> dict[str, Any]:
    return {
        "study_uid": s.study_instance_uid,
        "unit_id": s.unit_id,
        "unit_seq": s.unit_seq,
        "state": s.state,
        "patient_name": s.patient_name,
        "patient_id": s.patient_id,
        "study_description": s.study_description,
        "modalities": s.modalities,
        "instances": s.instances,
        "bytes": s.size_bytes,
        "destination": s.destination,
        "created_at": s.created_at.isoformat() + "Z",
        "last_instance_at": s.last_instance_at.isoformat() + "Z",
        "state_changed_at": s.state_changed_at.isoformat() + "Z",
        "age_s": round(_age_s(s.created_at), 1),
        "flags": [f for f in s.flags.split(",") if f],
        "error": s.error,
        "origin_peer": s.origin_peer,
        "method": s.method,
        "progress_bytes": s.progress_bytes,
        "bundle_bytes": s.bundle_bytes,
        "progress_pct": round(100 * s.progress_bytes / s.bundle_bytes, 1) if s.bundle_bytes else None,
        "attempts": s.attempts,
        "bundle_sha256": s.bundle_sha256,
        "receipt_at": s.receipt_at.isoformat() + "Z" if s.receipt_at else None,
        "awaiting_receipt_s": round(_age_s(s.state_changed_at), 1) if s.state == "sent" else None,
        "purged_at": s.purged_at.isoformat() + "Z" if s.purged_at else None,
        "archived_at": s.archived_at.isoformat() + "Z" if s.archived_at else None,
        "priority": s.priority,
        "rule": s.rule,
        "instances_of": s.instances_of,
        "next_attempt_at": s.next_attempt_at.isoformat() + "Z" if s.next_attempt_at else None,
    }


def _instance_json(unit_seq: int, i: InstanceRecord) -> dict[str, Any]:
    return {
        "sop_instance_uid": i.sop_instance_uid,
        "sop_class_uid": i.sop_class_uid,
        "transfer_syntax_uid": i.transfer_syntax_uid,
        "series_instance_uid": i.series_instance_uid,
        "series_number": i.series_number,
        "instance_number": i.instance_number,
        "modality": i.modality,
        "bytes": i.size_bytes,
        "sha256": i.sha256,
        "spool_path": i.spool_path,
        "conflict": i.conflict,
        "source": i.source,
        "unit_seq": unit_seq,
        "received_at": i.received_at.isoformat() + "Z",
        "pacs_status": i.pacs_status,
        "pacs_verdict": i.pacs_verdict,
        "pacs_detail": i.pacs_detail,
    }


def _study_json(study_uid: str, units: list[tuple[StudySummary, list[InstanceRecord]]]) -> dict[str, Any]:
    instances = [_instance_json(s.unit_seq, i) for s, rows in units for i in rows]
    return {
        "study_uid": study_uid,
        "units": [_summary_json(s) for s, _ in units],
        "series": _series(i for _, rows in units for i in rows),
        "instances": instances,
    }


def _series(instances: Any) -> list[dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = {}
    for i in instances:
        entry = grouped.setdefault(
            i.series_instance_uid,
            {
                "series_uid": i.series_instance_uid,
                "series_number": i.series_number,
                "description": i.series_description,
                "modality": i.modality,
                "instances": 0,
                "bytes": 0,
            },
        )
        entry["instances"] += 1
        entry["bytes"] += i.size_bytes
    return list(grouped.values())


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _human_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _console() -> Any:
    from rich.console import Console

    # Piped output (scripts, logs, tests) gets a wide fixed width so UIDs are never cut.
    return Console() if sys.stdout.isatty() else Console(width=240)


def _print_queue(studies: list[StudySummary], state: str | None, paging: tuple[int, int, int, int]) -> None:
    """The table, with the unit id (for `queue retry`) and the whole Study UID (for `queue show`): neither
    is ever cut; long descriptions are."""
    from rich.table import Table

    page, limit, live, history = paging
    first = (page - 1) * limit + 1
    where = f" in state {state}" if state else ""
    title = (f"Queue{where}: {live} live unit(s), {history} delivered; showing {first}-{first + len(studies) - 1}"
             if studies else f"Queue{where}: {live} live unit(s), {history} delivered; nothing on page {page}")
    table = Table(title=title, show_lines=False)
    uid_width = max((len(s.study_instance_uid) for s in studies), default=9)
    for column in ("Unit", "Study UID", "Patient", "Description", "Mod", "Inst", "Size", "State", "Age", "Destination", "Flags"):
        table.add_column(column, justify="right" if column in ("Unit", "Inst", "Size", "Age") else "left",
                         no_wrap=column in ("Unit", "Study UID"), min_width=uid_width if column == "Study UID" else None)
    for s in studies:
        table.add_row(*map(cell, (
            str(s.unit_id) + (f" (#{s.unit_seq})" if s.unit_seq > 1 else ""),
            s.study_instance_uid,
            s.patient_name or s.patient_id or "-",
            s.study_description or "-",
            s.modalities or "-",
            str(s.instances),
            _human_bytes(s.size_bytes),
            _state_text(s),
            _human_age(_age_s(s.created_at)),
            s.destination or (f"from {s.origin_peer}" if s.origin_peer else "-"),
            s.flags or "",
        )))
    _console().print(table)
    if first + len(studies) - 1 < live + history:
        print(f"more: dicomgw queue --page {page + 1} (or --limit N, --state STATE, --all)")


def _state_text(s: StudySummary) -> str:
    text = f"STAT {s.state}" if s.priority == "stat" else s.state
    if s.state in ("sending", "receiving") and s.bundle_bytes:
        text += f" {100 * s.progress_bytes // s.bundle_bytes}%"
        if awaiting_verdict(s):
            text += f" ({AWAITING_VERDICT})"
    if s.method and s.state in ("sending", "sent", "delivered"):
        text += f" ({s.method})"
    if s.origin_peer and s.state == "received":
        text += " (from peer)"
    if s.state == "sent" and s.origin_peer is None:
        text += f", no receipt yet ({_human_age(_age_s(s.state_changed_at))})"
    if s.purged_at is not None:
        text += ", spool purged"
    if s.archived_at is not None:
        text += ", rows archived"
    if s.error and s.state not in ("sent", "delivered"):
        text += f": {s.error}"
    return text


def _print_study(study_uid: str, units: list[tuple[StudySummary, list[InstanceRecord]]]) -> None:
    from rich.table import Table

    console = _console()
    for summary, instances in units:
        console.print(
            f"[bold]Study {markup(study_uid)}[/bold] unit {summary.unit_seq}: {markup(summary.state)}, "
            f"{summary.instances} instance(s), {_human_bytes(summary.size_bytes)}, "
            f"patient {markup(summary.patient_name or '-')} ({markup(summary.patient_id or '-')}), "
            f"{markup(summary.study_description or '-')}"
            + (f"; spool files purged {summary.purged_at:%Y-%m-%d}" if summary.purged_at else "")
            + (f"; rows archived {summary.archived_at:%Y-%m-%d} (retention of rows)" if summary.archived_at else "")
        )
        series_table = Table(title="Series")
        for column in ("Series UID", "No", "Modality", "Description", "Instances", "Size"):
            series_table.add_column(column)
        for entry in _series(instances):
            series_table.add_row(*map(cell, (
                entry["series_uid"],
                str(entry["series_number"] if entry["series_number"] is not None else "-"),
                entry["modality"] or "-",
                entry["description"] or "-",
                str(entry["instances"]),
                _human_bytes(entry["bytes"]),
            )))
        console.print(series_table)
        by_series: dict[str, list[InstanceRecord]] = defaultdict(list)
        for i in instances:
            by_series[i.series_instance_uid].append(i)
        table = Table(title="Instances")
        for column in ("No", "SOP Instance UID", "Transfer syntax", "Size", "SHA-256", "PACS", "Note"):
            table.add_column(column)
        for rows in by_series.values():
            for i in rows:
                table.add_row(*map(cell, (
                    str(i.instance_number if i.instance_number is not None else "-"),
                    i.sop_instance_uid,
                    i.transfer_syntax_uid,
                    _human_bytes(i.size_bytes),
                    i.sha256[:16] + "…",
                    (i.pacs_detail or "") if i.pacs_verdict else "",
                    "CONFLICT: differs from first copy" if i.conflict else "",
                )))
        console.print(table)
