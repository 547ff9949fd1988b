"""The gateway's one settings object: frozen, typed, loaded once from TOML plus environment.

Contract
- ``load_settings(path)`` reads a TOML file (stdlib ``tomllib``), applies ``DICOMGW_*`` environment
  overrides and returns a frozen :class:`Settings`. Nothing here runs at import time.
- Relative paths in the file resolve against ``base_dir``, which is itself relative to the directory of
  the config file (the shipped ``conf/gateway.toml`` sets ``base_dir = ".."`` so that ``var/`` lands in
  the checkout). A relative SQLite path in ``db_url`` resolves the same way.
- Every error names the key and what was wrong, as a :class:`SettingsError`.

Environment overrides (useful for containers and tests): ``DICOMGW_DB_URL``, ``DICOMGW_AE_TITLE``,
``DICOMGW_PORT``, ``DICOMGW_HOST``, ``DICOMGW_SPOOL_DIR``, ``DICOMGW_WATCH_DIR``,
``DICOMGW_QUARANTINE_DIR``, ``DICOMGW_STABLE_AGE_S``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.routing import Rule, RuleError, parse_rules
from gateway.terminal import plain, quoted

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars


SECRET_KEYS = ("password",)  # keys that must not sit in a file others can read


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class ModalitySettings:
    """A modality the gateway knows (``[[dicom.modalities]]``): where its Storage Commitment reports go."""

    ae_title: str
    host: str
    port: int
    tls: bool = False


COMMIT_WHEN = ("stored", "delivered")


@dataclass(frozen=True)
class DicomSettings:
    ae_title: str = "DICOMGW"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_pdu_bytes: int = 262144
    max_associations: int = 16
    max_associations_per_address: int = 0  # from one source address; 0: three quarters of max_associations
    network_timeout_s: float = 60.0
    artim_timeout_s: float = 10.0  # the whole A-ASSOCIATE-RQ must arrive within this (PS3.8 ARTIM)
    tls_port: int = 0  # a second listener for DICOM over TLS (PS3.15 B.1 suggests 2762); 0 = none
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # CA(s) client certificates must chain to
    require_client_cert: bool = True
    modalities: tuple[ModalitySettings, ...] = ()  # known modalities: Storage Commitment reports go to them
    # Storage Commitment (PS3.4 J): "stored" = committed once durably in the spool and the queue; "delivered" =
    # once the remote PACS's receipt covers it (after commit_timeout_s, what is not delivered is reported failed)
    commit_when: str = "stored"
    commit_timeout_s: float = 3600.0
    on_discontinued: str = "send"  # a DISCONTINUED MPPS: "send" its study as completed, or "hold" it for an admin

    def modality(self, ae_title: str) -> ModalitySettings | None:
        return next((m for m in self.modalities if m.ae_title == ae_title), None)


@dataclass(frozen=True)
class PathSettings:
    spool_dir: Path = Path("var/spool")
    watch_dir: Path | None = Path("var/incoming")
    quarantine_dir: Path = Path("var/quarantine")
    # Spool space kept for this site's own modalities: an inbound study from a peer is refused while taking it
    # would leave less than this free (the modalities may still fill the rest; 0: no reserve).
    spool_reserve_mb: int = 1024

    @property
    def spool_reserve_bytes(self) -> int:
        return self.spool_reserve_mb * 10**6


@dataclass(frozen=True)
class QueueSettings:
    db_url: str = "sqlite:///var/queue.db"
    stable_age_s: float = 30.0
    stable_check_interval_s: float = 1.0
    # The longest pause between two instances of one open association that still keeps its study in one unit
    # (None: ``stable_age_s``): a modality that sends reconstructions minutes apart on one association.
    association_pause_s: float | None = None
    lease_s: float = 60.0  # a claim (unit being sent or imported, inbound stream) lasts this long unless renewed


@dataclass(frozen=True)
class WatchSettings:
    settle_s: float = 2.0
    scan_interval_s: float = 0.5


@dataclass(frozen=True)
class XmppSettings:
    """The gateway's XMPP identity and transfer limits; empty ``jid`` = no XMPP (ingest only)."""

    jid: str = ""
    password: str = ""
    host: str = "127.0.0.1"
    port: int = 5222
    use_tls: bool = True
    methods: tuple[str, ...] = ("s5b", "ibb")
    ibb_block_bytes: int = 65535
    ibb_window: int = 8
    peers: tuple[str, ...] = ()
    max_inbound: int = 2
    stat_reserve: int = 1  # inbound transfers admitted beyond max_inbound for STAT offers only
    max_study_bytes: int = 20 * 10**9
    retry_base_s: float = 2.0
    retry_max_s: float = 60.0
    retry_max_attempts: int = 20  # transient failures of one study before it goes to `dead`
    retry_max_age_s: float = 7 * 86400.0  # ... or this long since it was queued
    verdict_timeout_s: float = 600.0
    s5b_idle_timeout_s: float = 120.0  # an inbound S5B stream silent this long counts as cut (resumed later)
    ibb_idle_timeout_s: float = 120.0  # ... and an open inbound IBB stream with no block for this long
    dispatch_interval_s: float = 1.0
    s5b_proxy: str = ""  # "host:port" to use instead of the address the server's proxy advertises
    receipt_timeout_s: float = 3600.0  # a sent study without a delivery receipt after this is sent again
    max_sends: int = 3  # ... at most this many times in all, then it is marked failed
    ca_file: Path | None = None  # PEM CA(s) for the XMPP server's certificate; None: the system store
    server_cert_sha256: str = ""  # optional pin of the XMPP server's certificate
    identity_key_file: Path = Path("var/identity/gateway.key")  # this gateway's end-to-end identity (0600)
    identity_cert_file: Path = Path("var/identity/gateway.crt")
    require_e2e: bool = True  # false (lab only): peers without a pinned certificate exchange in plaintext
    peer_pins: tuple[tuple[str, str], ...] = ()  # (bare JID, certificate SHA-256) from the TOML `peers`
    stream_start_timeout_s: float = 60.0  # an accepted offer whose stream does not start is released
    handshake_timeout_s: float = 15.0  # an accepted end-to-end offer without a finished TLS handshake by then is released
    compress: bool = True  # the bundle as zstd frames where it pays (gateway.wire); off: always plain bytes
    # the server's nodes, tried in turn (a node that goes away: the next); empty: (host, port). host "" too: the
    # nodes from DNS SRV _xmpp-client._tcp of the JID's domain (else the domain itself on 5222), each round anew
    servers: tuple[tuple[str, int], ...] = ()
    dns_servers: tuple[str, ...] = ()  # resolvers asked for that lookup ("ip:port"); empty: /etc/resolv.conf's
    reconnect_s: float = 5.0  # the longest wait between connection attempts (the next node is tried at once)
    presence_min_interval_s: float = 2.0  # flow-control presence (dnd at the inbound limit) at most this often

    def pin_for(self, peer_jid: str) -> str | None:
        return next((fp for jid, fp in self.peer_pins if jid == peer_jid), None)

    @property
    def enabled(self) -> bool:
        return bool(self.jid)


@dataclass(frozen=True)
class PacsSettings:
    """The local PACS that received studies are imported into; empty ``host`` = no import (they stay received)."""

    ae_title: str = "PACS"
    host: str = ""
    port: int = 104
    calling_ae_title: str = "DICOMGW"  # the loader puts the gateway's own [dicom] ae_title here
    timeout_s: float = 60.0
    parallel_studies: int = 2
    associations_per_study: int = 2  # C-STORE associations one study's import uses at once
    max_attempts: int = 10
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    storage_commitment: bool = False
    commitment_timeout_s: float = 600.0
    tls: bool = False  # DICOM over TLS to the PACS (BCP 195 profile)
    tls_ca_file: Path | None = None  # CA the PACS's certificate chains to (None: the system store)
    tls_cert_file: Path | None = None  # our client certificate, when the PACS requires one
    tls_key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RetentionSettings:
    """Spool clean-up: files of ``delivered`` units are removed ``keep_delivered_s`` after delivery
    (never before; a negative value keeps them for ever). Rows: ``keep_rows_days`` after delivery (and after the
    files went) a unit's instance and transfer rows move to the archive tables (0: never); its unit row and audit
    trail stay, and ``queue show`` reads the archive too."""

    keep_delivered_s: float = 7 * 86400.0
    check_interval_s: float = 300.0
    keep_rows_days: float = 0.0


@dataclass(frozen=True)
class RoutingSettings:
    """Where stable studies go: ``rules`` (``gateway.routing``, first match wins), else
    ``default_destination`` (a destination per the naming standard, ``radiology.hospital-b``)."""

    default_destination: str = ""
    rules: tuple[Rule, ...] = ()
    timezone: str = ""  # the zone transfer windows are read in (IANA name); empty: the system's


@dataclass(frozen=True)
class WebSettings:
    """The admin web page and /metrics (``adapters.web``); port 0 = off. Basic auth when ``auth_user`` is
    set (``auth_password_hash`` from ``dicomgw web hash-password``); TLS with ``tls_cert_file`` and
    ``tls_key_file``, a client certificate required when ``client_ca_file`` is set."""

    host: str = "127.0.0.1"
    port: int = 0
    refresh_s: int = 5
    auth_user: str = ""
    auth_password_hash: str = ""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class Settings:
    dicom: DicomSettings = field(default_factory=DicomSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    xmpp: XmppSettings = field(default_factory=XmppSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    pacs: PacsSettings = field(default_factory=PacsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    web: WebSettings = field(default_factory=WebSettings)
    log_format: str = "text"  # [log] format: "text" for people, "json" for a log collector (gateway.logs)
    source: Path | None = None
    coerce: tuple[Any, ...] = ()  # [[import.coerce]] rules (gateway.coercion.CoerceRule), first match per peer

    def calling_ae_allowed(self, calling_ae_title: str) -> bool:
        allowed = self.dicom.allowed_calling_ae_titles
        return not allowed or calling_ae_title.strip() in allowed

    def files_to_read(self) -> list[tuple[str, Path]]:
        """(key, path) of every file the settings name that ``run`` reads at start and cannot make itself:
        certificates, keys and CAs of the parts that are on (the end-to-end identity is made when missing)."""
        d, x, p, w = self.dicom, self.xmpp, self.pacs, self.web
        named = [("dicom.tls_cert_file", d.tls_cert_file), ("dicom.tls_key_file", d.tls_key_file),
                 ("dicom.tls_ca_file", d.tls_ca_file)] if d.tls_port else []
        if x.enabled:
            named.append(("xmpp.ca_file", x.ca_file))
        if p.enabled:
            named += [("pacs.tls_ca_file", p.tls_ca_file), ("pacs.tls_cert_file", p.tls_cert_file),
                      ("pacs.tls_key_file", p.tls_key_file)]
        if w.port:
            named += [("web.tls_cert_file", w.tls_cert_file), ("web.tls_key_file", w.tls_key_file),
                      ("web.client_ca_file", w.client_ca_file)]
        return [(key, path) for key, path in named if path is not None]


def _log_format(value: str) -> str:
    if value not in ("text", "json"):
        raise SettingsError(f"log.format = {quoted(value)}: use \"text\" or \"json\"")
    return value


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Load and validate the TOML file at ``path`` plus ``DICOMGW_*`` overrides from ``environ``."""
    config_path = Path(path).resolve()
    try:
        with config_path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {config_path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{config_path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8: a file saved in Latin-1, or binary
        raise SettingsError(f"{config_path}: not valid TOML: not UTF-8 at byte {exc.start}") from None
    except OSError as exc:  # not ours to read (an admin's own user, a file of root's), a folder
        raise SettingsError(f"cannot read the config file {config_path}: {exc.strerror}") from None
    env = os.environ if environ is None else environ
    inline = [f"{name}.{key}" for name, table in raw.items() if isinstance(table, Mapping)
              for key in SECRET_KEYS if table.get(key)]
    mode = config_path.stat().st_mode
    if inline and mode & 0o077:
        raise SettingsError(
            f"{config_path} holds a secret ({', '.join(inline)}) and may be read by others (mode {mode & 0o777:o}): "
            f"chmod 600 it, or move the secret to password_file / DICOMGW_XMPP_PASSWORD"
        )
    base_dir = (config_path.parent / str(raw.get("base_dir", "."))).resolve()
    return settings_from_mapping(raw, base_dir, env, source=config_path)


class _ReadTable(dict):  # type: ignore[type-arg]
    """A TOML table that notes which of its keys the settings read: what none read is a key this gateway does
    not know (a typo such as ``allowed_calling_ae_title`` would otherwise let every modality in, silently).
    Tables inside are tracked too; a list of tables checks its own keys (``[[routing.rules]]`` and the like)."""

    def __init__(self, data: Mapping[str, Any], where: str = "") -> None:
        super().__init__(data)
        self.where = where
        self.seen: set[str] = set()

    def _tracked(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if isinstance(value, dict) and not isinstance(value, _ReadTable):
            value = _ReadTable(value, f"{self.where}{key}.")
            dict.__setitem__(self, key, value)
        return value

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return self._tracked(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.seen.add(key)
        return self._tracked(key) if dict.__contains__(self, key) else default

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return dict.__contains__(self, key)

    def unread(self) -> list[str]:
        """Every key none read, as ``table.key`` (a whole table none read: ``[table]``)."""
        found = []
        for key, value in dict.items(self):
            if key not in self.seen:
                found.append(f"[{self.where}{key}]" if isinstance(value, dict) else f"{self.where}{key}")
            elif isinstance(value, _ReadTable):
                found += value.unread()
        return found


def _known_keys_only(table: _ReadTable) -> None:
    """Refuse the keys no setting read, each with the known key it most resembles."""
    unknown = table.unread()
    if not unknown:
        return
    import difflib

    def hint(name: str) -> str:
        where, _, key = name.strip("[]").rpartition(".")
        parent: Any = table
        for part in where.split(".") if where else ():
            parent = dict.get(parent, part, {})
        known = sorted(parent.seen) if isinstance(parent, _ReadTable) else []
        close = difflib.get_close_matches(key, known or [k for k in table.seen], n=1, cutoff=0.6)
        return f"{quoted(name)} (did you mean {'.'.join([where, close[0]]) if where else close[0]}?)" if close else quoted(name)

    names = [hint(name) for name in unknown[:10]]
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    raise SettingsError(f"unknown key(s) {', '.join(names)}{more}: this gateway does not read them (a typo, or a "
                        f"setting of another version; see conf/gateway.toml)")


def settings_from_mapping(
    raw: Mapping[str, Any], base_dir: Path, environ: Mapping[str, str], source: Path | None = None
) -> Settings:
    """Build settings from an already-parsed mapping (the TOML document's shape); a key it does not read is
    refused (:func:`_known_keys_only`)."""
    raw = _ReadTable(raw)
    settings = _settings(raw, base_dir, environ, source)
    raw.get("base_dir")  # read by load_settings, before this
    _known_keys_only(raw)
    return settings


def _settings(raw: Mapping[str, Any], base_dir: Path, environ: Mapping[str, str], source: Path | None) -> Settings:
    dicom_raw = _table(raw, "dicom")
    paths_raw = _table(raw, "paths")
    queue_raw = _table(raw, "queue")
    watch_raw = _table(raw, "watch")

    dicom = DicomSettings(
        ae_title=_ae_title(environ.get("DICOMGW_AE_TITLE", dicom_raw.get("ae_title", "DICOMGW")), "dicom.ae_title"),
        host=str(environ.get("DICOMGW_HOST", dicom_raw.get("host", "127.0.0.1"))),
        port=_int(environ.get("DICOMGW_PORT", dicom_raw.get("port", 11112)), "dicom.port", 0, 65535),
        allowed_calling_ae_titles=tuple(
            _ae_title(t, "dicom.allowed_calling_ae_titles") for t in dicom_raw.get("allowed_calling_ae_titles", [])
        ),
        max_pdu_bytes=_int(dicom_raw.get("max_pdu_bytes", 262144), "dicom.max_pdu_bytes", 0, 2**32 - 1),
        max_associations=_int(dicom_raw.get("max_associations", 16), "dicom.max_associations", 1, 1000),
        max_associations_per_address=_int(dicom_raw.get("max_associations_per_address", 0),
                                          "dicom.max_associations_per_address", 0, 1000),
        network_timeout_s=_float(dicom_raw.get("network_timeout_s", 60.0), "dicom.network_timeout_s", 0.1),
        artim_timeout_s=_float(dicom_raw.get("artim_timeout_s", 10.0), "dicom.artim_timeout_s", 0.1),
        tls_port=_int(dicom_raw.get("tls_port", 0), "dicom.tls_port", 0, 65535),
        tls_cert_file=_path(dicom_raw["tls_cert_file"], base_dir) if dicom_raw.get("tls_cert_file") else None,
        tls_key_file=_path(dicom_raw["tls_key_file"], base_dir) if dicom_raw.get("tls_key_file") else None,
        tls_ca_file=_path(dicom_raw["tls_ca_file"], base_dir) if dicom_raw.get("tls_ca_file") else None,
        require_client_cert=_bool(dicom_raw.get("require_client_cert", True), "dicom.require_client_cert"),
        modalities=_modalities(dicom_raw.get("modalities", [])),
        commit_when=str(dicom_raw.get("commit_when", "stored")),
        commit_timeout_s=_float(dicom_raw.get("commit_timeout_s", 3600.0), "dicom.commit_timeout_s", 1.0),
        on_discontinued=str(dicom_raw.get("on_discontinued", "send")),
    )
    if dicom.on_discontinued not in ("send", "hold"):
        raise SettingsError(f"dicom.on_discontinued {quoted(dicom.on_discontinued)}: send or hold")
    if dicom.commit_when not in COMMIT_WHEN:
        raise SettingsError(f"dicom.commit_when {quoted(dicom.commit_when)}: one of {', '.join(COMMIT_WHEN)}")
    if dicom.allowed_calling_ae_titles and dicom.modalities:  # a known modality may always associate
        known = tuple(m.ae_title for m in dicom.modalities if m.ae_title not in dicom.allowed_calling_ae_titles)
        dicom = replace(dicom, allowed_calling_ae_titles=dicom.allowed_calling_ae_titles + known)
    if dicom.tls_port and not (dicom.tls_cert_file and dicom.tls_key_file):
        raise SettingsError("dicom.tls_port needs tls_cert_file and tls_key_file")
    if dicom.tls_port and dicom.require_client_cert and not dicom.tls_ca_file:
        raise SettingsError("dicom.require_client_cert needs tls_ca_file (the CA client certificates chain to)")
    watch_value = environ.get("DICOMGW_WATCH_DIR", paths_raw.get("watch_dir", "var/incoming"))
    paths = PathSettings(
        spool_dir=_path(environ.get("DICOMGW_SPOOL_DIR", paths_raw.get("spool_dir", "var/spool")), base_dir),
        watch_dir=_path(watch_value, base_dir) if watch_value else None,
        quarantine_dir=_path(
            environ.get("DICOMGW_QUARANTINE_DIR", paths_raw.get("quarantine_dir", "var/quarantine")), base_dir
        ),
        spool_reserve_mb=_int(paths_raw.get("spool_reserve_mb", 1024), "paths.spool_reserve_mb", 0, 2**40),
    )
    queue = QueueSettings(
        db_url=_db_url(str(environ.get("DICOMGW_DB_URL", queue_raw.get("db_url", "sqlite:///var/queue.db"))), base_dir),
        stable_age_s=_float(environ.get("DICOMGW_STABLE_AGE_S", queue_raw.get("stable_age_s", 30.0)), "queue.stable_age_s", 0.0),
        stable_check_interval_s=_float(queue_raw.get("stable_check_interval_s", 1.0), "queue.stable_check_interval_s", 0.05),
        association_pause_s=(None if queue_raw.get("association_pause_s") is None else
                             _float(queue_raw["association_pause_s"], "queue.association_pause_s", 0.0)),
        lease_s=_float(queue_raw.get("lease_s", 60.0), "queue.lease_s", 1.0),
    )
    watch = WatchSettings(
        settle_s=_float(watch_raw.get("settle_s", 2.0), "watch.settle_s", 0.0),
        scan_interval_s=_float(watch_raw.get("scan_interval_s", 0.5), "watch.scan_interval_s", 0.05),
    )
    return Settings(
        dicom=dicom, paths=paths, queue=queue, watch=watch, xmpp=_xmpp(_table(raw, "xmpp"), environ, base_dir),
        routing=_routing(_table(raw, "routing")),
        web=_web(_table(raw, "web"), base_dir),
        pacs=_pacs(_table(raw, "pacs"), dicom.ae_title, base_dir),
        log_format=_log_format(str(environ.get("DICOMGW_LOG_FORMAT", _table(raw, "log").get("format", "text")))),
        coerce=_coerce(_table(raw, "import").get("coerce"), base_dir),
        retention=RetentionSettings(
            keep_delivered_s=_float(_table(raw, "retention").get("keep_delivered_s", 7 * 86400.0), "retention.keep_delivered_s", 0.0),
            check_interval_s=_float(_table(raw, "retention").get("check_interval_s", 300.0), "retention.check_interval_s", 0.05),
            keep_rows_days=_float(_table(raw, "retention").get("keep_rows_days", 0.0), "retention.keep_rows_days", 0.0),
        ),
        source=source,
    )


def _web(raw: Mapping[str, Any], base_dir: Path) -> WebSettings:
    web = WebSettings(
        host=str(raw.get("host", "127.0.0.1")),
        port=_int(raw.get("port", 0), "web.port", 0, 65535),
        refresh_s=_int(raw.get("refresh_s", 5), "web.refresh_s", 1, 3600),
        auth_user=str(raw.get("auth_user", "")),
        auth_password_hash=str(raw.get("auth_password_hash", "")),
        tls_cert_file=_path(raw["tls_cert_file"], base_dir) if raw.get("tls_cert_file") else None,
        tls_key_file=_path(raw["tls_key_file"], base_dir) if raw.get("tls_key_file") else None,
        client_ca_file=_path(raw["client_ca_file"], base_dir) if raw.get("client_ca_file") else None,
    )
    if web.auth_user and not web.auth_password_hash.startswith("pbkdf2_sha256$"):
        raise SettingsError("web.auth_user needs auth_password_hash (make one with: dicomgw web hash-password)")
    if bool(web.tls_cert_file) != bool(web.tls_key_file):
        raise SettingsError("web.tls_cert_file and web.tls_key_file go together")
    if web.client_ca_file and not web.tls_cert_file:
        raise SettingsError("web.client_ca_file (client certificates) needs tls_cert_file and tls_key_file")
    if web.port and not web.auth_user and not web.client_ca_file and web.host not in ("127.0.0.1", "::1", "localhost"):
        raise SettingsError(f"web.host {quoted(web.host)} is not loopback: set auth_user/auth_password_hash or client_ca_file")
    return web


def _coerce(raw: Any, base_dir: Path) -> tuple[Any, ...]:
    from gateway.coercion import CoerceError, parse_rules

    try:
        return parse_rules(raw, base_dir)
    except CoerceError as exc:
        raise SettingsError(str(exc)) from None


def _modalities(raw: Any) -> tuple[ModalitySettings, ...]:
    if not isinstance(raw, list):
        raise SettingsError("dicom.modalities: a list of tables ([[dicom.modalities]] with ae_title, host, port)")
    found = []
    for n, table in enumerate(raw, 1):
        where = f"dicom.modalities #{n}"
        if not isinstance(table, dict) or not {"ae_title", "host", "port"} <= set(table):
            raise SettingsError(f"{where}: needs ae_title, host and port (where its commitment reports go)")
        unknown = set(table) - {"ae_title", "host", "port", "tls"}
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        found.append(ModalitySettings(_ae_title(table["ae_title"], f"{where}.ae_title"), str(table["host"]),
                                      _int(table["port"], f"{where}.port", 1, 65535), _bool(table.get("tls", False), f"{where}.tls")))
    titles = [m.ae_title for m in found]
    if len(set(titles)) != len(titles):
        raise SettingsError("dicom.modalities: an AE title is listed twice")
    return tuple(found)


def _routing(raw: Mapping[str, Any]) -> RoutingSettings:
    from gateway.addressing import destination_jid

    def check(destination: str) -> None:
        destination_jid(destination, "example.org")

    default = str(raw.get("default_destination", ""))
    zone = str(raw.get("timezone", "") or "")
    try:
        if default:
            check(default)
        if zone:
            from gateway.windows import local_zone

            local_zone(zone)
        return RoutingSettings(default_destination=default, rules=parse_rules(raw.get("rules"), check), timezone=zone)
    except (RuleError, ValueError) as exc:
        raise SettingsError(f"routing: {exc}") from None


def _pacs(raw: Mapping[str, Any], own_ae_title: str, base_dir: Path = Path(".")) -> PacsSettings:
    host = str(raw.get("host", ""))
    return PacsSettings(
        ae_title=_ae_title(raw.get("ae_title", "PACS"), "pacs.ae_title"),
        host=host,
        port=_int(raw.get("port", 104), "pacs.port", 1, 65535),
        calling_ae_title=_ae_title(raw.get("calling_ae_title") or own_ae_title, "pacs.calling_ae_title"),
        timeout_s=_float(raw.get("timeout_s", 60.0), "pacs.timeout_s", 0.1),
        parallel_studies=_int(raw.get("parallel_studies", 2), "pacs.parallel_studies", 1, 64),
        associations_per_study=_int(raw.get("associations_per_study", 2), "pacs.associations_per_study", 1, 16),
        max_attempts=_int(raw.get("max_attempts", 10), "pacs.max_attempts", 1, 10000),
        retry_base_s=_float(raw.get("retry_base_s", 5.0), "pacs.retry_base_s", 0.01),
        retry_max_s=_float(raw.get("retry_max_s", 300.0), "pacs.retry_max_s", 0.01),
        storage_commitment=_bool(raw.get("storage_commitment", False), "pacs.storage_commitment"),
        commitment_timeout_s=_float(raw.get("commitment_timeout_s", 600.0), "pacs.commitment_timeout_s", 0.1),
        tls=_bool(raw.get("tls", False), "pacs.tls"),
        tls_ca_file=_path(raw["tls_ca_file"], base_dir) if raw.get("tls_ca_file") else None,
        tls_cert_file=_path(raw["tls_cert_file"], base_dir) if raw.get("tls_cert_file") else None,
        tls_key_file=_path(raw["tls_key_file"], base_dir) if raw.get("tls_key_file") else None,
    )


def _peers(raw: Any) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``peers = ["jid", { jid = "...", fingerprint = "..." }]``: the allowed JIDs and their pins."""
    from gateway.pins import normalize_fingerprint

    if not isinstance(raw, list):
        raise SettingsError("xmpp.peers: must be a list of JIDs or { jid, fingerprint } tables")
    jids: list[str] = []
    pins: list[tuple[str, str]] = []
    for item in raw:
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"jid", "fingerprint"})
            if unknown:  # a misspelt fingerprint would leave the peer unpinned
                raise SettingsError(f"xmpp.peers: {quoted(str(item.get('jid', '')))}: unknown key(s) {', '.join(unknown)} "
                                    f"(a peer is {{ jid = \"...\", fingerprint = \"...\" }})")
            jid = str(item.get("jid", ""))
            if item.get("fingerprint"):
                try:
                    pins.append((jid, normalize_fingerprint(str(item["fingerprint"]))))
                except ValueError as exc:
                    raise SettingsError(f"xmpp.peers: {jid}: {exc}") from None
        else:
            jid = str(item)
        jids.append(jid)
    return tuple(jids), tuple(pins)


def _secret(raw: Mapping[str, Any], key: str, environ: Mapping[str, str], env_key: str, base_dir: Path) -> str:
    """A secret from the environment, from ``<key>_file`` (a file only its owner may read), or inline."""
    file_value, inline = raw.get(f"{key}_file"), raw.get(key, "")  # both read: neither is an unknown key
    if environ.get(env_key):
        return str(environ[env_key])
    if file_value:
        path = _path(file_value, base_dir)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise SettingsError(f"xmpp.{key}_file: cannot read {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise SettingsError(f"xmpp.{key}_file: {path} may be read by others (mode {mode & 0o777:o}); chmod 600 it")
        return path.read_text().strip()
    return str(inline)


def _xmpp(raw: Mapping[str, Any], environ: Mapping[str, str], base_dir: Path = Path(".")) -> XmppSettings:
    from gateway.addressing import AddressError, parse
    from gateway.pins import normalize_fingerprint

    jid = str(environ.get("DICOMGW_XMPP_JID", raw.get("jid", "")))
    peers, peer_pins = _peers(raw.get("peers", []))
    try:
        if jid:
            parse(jid)
        for peer in peers:
            parse(peer)
    except AddressError as exc:
        raise SettingsError(f"xmpp: {exc}") from None
    server_pin = str(raw.get("server_cert_sha256", ""))
    if server_pin:
        try:
            server_pin = normalize_fingerprint(server_pin)
        except ValueError as exc:
            raise SettingsError(f"xmpp.server_cert_sha256: {exc}") from None
    methods = tuple(str(m) for m in raw.get("methods", ["s5b", "ibb"]))
    if not methods or any(m not in ("s5b", "ibb") for m in methods):
        raise SettingsError(f"xmpp.methods: {quoted(list(methods))} must list 's5b' and/or 'ibb'")
    return XmppSettings(
        jid=jid,
        password=_secret(raw, "password", environ, "DICOMGW_XMPP_PASSWORD", base_dir),
        host=str(raw.get("host", "127.0.0.1")),
        port=_int(raw.get("port", 5222), "xmpp.port", 1, 65535),
        use_tls=_bool(raw.get("use_tls", True), "xmpp.use_tls"),
        methods=methods,
        ibb_block_bytes=_int(raw.get("ibb_block_bytes", 65535), "xmpp.ibb_block_bytes", 1, 65535),
        ibb_window=_int(raw.get("ibb_window", 8), "xmpp.ibb_window", 1, 64),
        peers=peers,
        max_inbound=_int(raw.get("max_inbound", 2), "xmpp.max_inbound", 1, 100),
        stat_reserve=_int(raw.get("stat_reserve", 1), "xmpp.stat_reserve", 0, 100),
        max_study_bytes=_int(raw.get("max_study_bytes", 20 * 10**9), "xmpp.max_study_bytes", 1, 2**62),
        retry_base_s=_float(raw.get("retry_base_s", 2.0), "xmpp.retry_base_s", 0.01),
        retry_max_s=_float(raw.get("retry_max_s", 60.0), "xmpp.retry_max_s", 0.01),
        retry_max_attempts=_int(raw.get("retry_max_attempts", 20), "xmpp.retry_max_attempts", 1, 100000),
        retry_max_age_s=_float(raw.get("retry_max_age_s", 7 * 86400.0), "xmpp.retry_max_age_s", 1.0),
        verdict_timeout_s=_float(raw.get("verdict_timeout_s", 600.0), "xmpp.verdict_timeout_s", 1.0),
        s5b_idle_timeout_s=_float(raw.get("s5b_idle_timeout_s", 120.0), "xmpp.s5b_idle_timeout_s", 1.0),
        ibb_idle_timeout_s=_float(raw.get("ibb_idle_timeout_s", 120.0), "xmpp.ibb_idle_timeout_s", 0.5),
        dispatch_interval_s=_float(raw.get("dispatch_interval_s", 1.0), "xmpp.dispatch_interval_s", 0.05),
        s5b_proxy=str(raw.get("s5b_proxy", "")),
        receipt_timeout_s=_float(raw.get("receipt_timeout_s", 3600.0), "xmpp.receipt_timeout_s", 0.1),
        max_sends=_int(raw.get("max_sends", 3), "xmpp.max_sends", 1, 1000),
        ca_file=_path(raw["ca_file"], base_dir) if raw.get("ca_file") else None,
        server_cert_sha256=server_pin,
        identity_key_file=_path(raw.get("identity_key_file", "var/identity/gateway.key"), base_dir),
        identity_cert_file=_path(raw.get("identity_cert_file", "var/identity/gateway.crt"), base_dir),
        require_e2e=_bool(raw.get("require_e2e", True), "xmpp.require_e2e"),
        compress=_bool(raw.get("compress", True), "xmpp.compress"),
        servers=_servers(raw.get("servers", [])),
        dns_servers=_dns_servers(raw.get("dns_servers", [])),
        reconnect_s=_float(raw.get("reconnect_s", 5.0), "xmpp.reconnect_s", 0.1),
        presence_min_interval_s=_float(raw.get("presence_min_interval_s", 2.0), "xmpp.presence_min_interval_s", 0.0),
        peer_pins=peer_pins,
        stream_start_timeout_s=_float(raw.get("stream_start_timeout_s", 60.0), "xmpp.stream_start_timeout_s", 0.1),
        handshake_timeout_s=_float(raw.get("handshake_timeout_s", 15.0), "xmpp.handshake_timeout_s", 0.1),
    )


def with_overrides(settings: Settings, **sections: Any) -> Settings:
    """Return a copy with whole sections replaced (used by the demo and tests)."""
    return replace(settings, **sections)


def _table(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise SettingsError(f"[{name}] must be a table")
    return value


def _ae_title(value: Any, key: str) -> str:
    text = str(value).strip()
    if not AE_TITLE_RE.match(text):
        raise SettingsError(f"{key}: {quoted(value)} is not a valid AE title (1-16 printable characters, no backslash)")
    return text


def _int(value: Any, key: str, low: int, high: int) -> int:
    """A whole number within low..high: TOML's integer, or text of one (the environment); a fraction, true/false,
    inf or nan is refused (``int()`` alone would truncate 1.7 to 1, take true as 1 and raise on inf)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise SettingsError(f"{key}: {quoted(value)} is not a whole number")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise SettingsError(f"{key}: {quoted(value)} is not a whole number") from None
    if not low <= number <= high:
        raise SettingsError(f"{key}: {quoted(number)} is outside {low}..{high}")
    return number


def _servers(value: Any) -> tuple[tuple[str, int], ...]:
    """``[xmpp] servers``: a list of "host:port" ("[v6]:port" for an IPv6 address)."""
    if not isinstance(value, list) or len(value) > 64:
        raise SettingsError('xmpp.servers: a list of "host:port" (at most 64)')
    found = []
    for n, entry in enumerate(value):
        text = str(entry)
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if (not isinstance(entry, str) or not sep or not host or len(host) > 253 or not port.isascii() or not port.isdigit()
                or not 1 <= int(port) <= 65535 or any(not c.isprintable() or c.isspace() or c in "/@[]" for c in host)):
            raise SettingsError(f"xmpp.servers[{n}]: {quoted(text)} is not host:port")
        found.append((host, int(port)))
    return tuple(found)


def _dns_servers(value: Any) -> tuple[str, ...]:
    """``[xmpp] dns_servers``: resolvers as IP addresses, each with an optional port ("192.0.2.53", "192.0.2.53:5353",
    "[2001:db8::53]:53"); given to the resolver as "ip:port" ("[v6]:port")."""
    if not isinstance(value, list) or len(value) > 8:
        raise SettingsError('xmpp.dns_servers: a list of IP addresses, each with an optional ":port" (at most 8)')
    found = []
    for n, entry in enumerate(value):
        text = entry if isinstance(entry, str) else ""
        host, port = text, "53"
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            port = rest[1:] if sep and rest.startswith(":") else ("53" if sep and not rest else "")
        elif text.count(":") == 1:
            host, port = text.split(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is None or not port.isascii() or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
            raise SettingsError(f"xmpp.dns_servers[{n}]: {quoted(entry)} is not an IP address with an optional :port")
        found.append(f"[{address}]:{int(port)}" if address.version == 6 else f"{address}:{int(port)}")
    return tuple(found)


def _bool(value: Any, key: str) -> bool:
    """A TOML true or false, nothing else: ``bool("false")`` is True and ``bool("")`` False, so a quoted value
    would turn ``require_e2e = ""`` into plaintext exchange, silently."""
    if not isinstance(value, bool):
        raise SettingsError(f"{key}: {quoted(value)} is not true or false (write it without quotes)")
    return value


def _float(value: Any, key: str, low: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key}: {quoted(value)} is not a number") from None
    except OverflowError:  # an integer of a thousand digits: beyond a float
        number = math.inf
    if math.isnan(number):  # NaN compares false with every bound
        raise SettingsError(f"{key}: {quoted(value)} is not a number")
    if math.isinf(number):  # "inf", 1e999, a thousand nines: no timer, size or interval is infinite
        raise SettingsError(f"{key}: {quoted(str(value), 40)} is not a finite number")
    if number < low:
        raise SettingsError(f"{key}: {number} is below {low}")
    return number


def _path(value: Any, base_dir: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


DB_URL_FORMS = "use sqlite:///path/queue.db or postgresql+psycopg://user@host/database"


def _db_url(url: str, base_dir: Path) -> str:
    """Resolve a relative SQLite file path against ``base_dir``; other URLs pass unchanged. A URL that is not
    SQLite or PostgreSQL with a driver this install has is refused here, by name, not as a traceback later."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise SettingsError(f"queue.db_url: {parsed.get_backend_name()!r} databases are not supported: "
                                f"{DB_URL_FORMS}")
        parsed.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError: first
        raise SettingsError(f"queue.db_url: no driver for {parsed.drivername!r} in this install ({plain(str(exc))[:120]}): "
                            f"{DB_URL_FORMS}") from None
    except (ArgumentError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"queue.db_url {quoted(url)} is not a database URL: {DB_URL_FORMS}") from None
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return prefix + str(_path(url[len(prefix):], base_dir))
    return url
