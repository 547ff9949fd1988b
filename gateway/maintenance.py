"""Maintenance: an admin takes this gateway out of the exchange for a while (``dicomgw maintenance on``).

The switch is a row in ``runtime_status`` (name ``maintenance``) so that the CLI and every running process
of the gateway share it; the running gateway reads it each tick, shows ``dnd`` with the message as its
presence (peers' dispatchers hold their sends to it: ``waiting-peer``) and refuses offers as busy while it
is on. Each switch is audited.

The XMPP server's operator can switch every gateway at once, as the field study proposed: a server-wide
announcement (Prosody's mod_announce: a message from an admin to ``DOMAIN/announce/online``; ejabberd's
mod_announce: ``DOMAIN/announce/online`` likewise) arrives at each gateway from the bare server domain. A
gateway obeys one whose first line is exactly ``dicomgw maintenance on[: TEXT]`` or ``dicomgw maintenance
off`` (any case); any other announcement is audited and otherwise ignored. Only the server
itself can send from its bare domain (it stamps the sender), so no other account can switch gateways.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gateway.store import QueueStore, utcnow
from gateway.terminal import plain

STATUS_NAME = "maintenance"


@dataclass(frozen=True)
class Maintenance:
    on: bool
    message: str = ""
    since: str = ""

    @property
    def status_text(self) -> str:
        return f"maintenance: {self.message}" if self.message else "maintenance"


def set_maintenance(store: QueueStore, on: bool, message: str = "", who: str = "admin") -> Maintenance:
    state = Maintenance(on, message if on else "", utcnow().isoformat() if on else "")
    store.set_runtime_status(STATUS_NAME, json.dumps(state.__dict__))
    store.audit("maintenance", f"maintenance {'on' if on else 'off'} by {who}" + (f": {message}" if on and message else ""))
    return state


def maintenance(store: QueueStore) -> Maintenance:
    row = store.runtime_status(STATUS_NAME)
    if row is None:
        return Maintenance(False)
    try:
        data = json.loads(row[0])
        return Maintenance(bool(data.get("on")), str(data.get("message", "")), str(data.get("since", "")))
    except (ValueError, AttributeError):
        return Maintenance(False)


MAX_MESSAGE = 200  # characters of a maintenance message (peers see it in this gateway's presence)
_ANNOUNCEMENT = re.compile(r"^dicomgw maintenance (on|off)(?:: (.*))?$", re.IGNORECASE)


def parse_announcement(text: str) -> tuple[bool, str] | None:
    """(on, message) for a maintenance announcement from the XMPP server; None for any other text. The first
    line must be exactly ``dicomgw maintenance on``, ``dicomgw maintenance on: TEXT`` or ``dicomgw maintenance
    off`` (any case, spaces at either end ignored): an operator's "Maintenance on the roof tomorrow" or
    "maintenance on-call list attached" switches nothing. Control characters and NUL are taken out of TEXT."""
    first = (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""
    found = _ANNOUNCEMENT.match(first)
    if not found:
        return None
    return found.group(1).lower() == "on", plain(found.group(2) or "").strip()[:MAX_MESSAGE]


def obey_announcement(store: QueueStore, server: str, text: str) -> Maintenance | None:
    """Apply a server announcement (audited either way); the new state, or None when it was not one."""
    parsed = parse_announcement(text)
    if parsed is None:
        store.audit("server_announcement", f"from {server} (not a maintenance switch, ignored): {plain(text).strip()[:300]}")
        return None
    on, message = parsed
    return set_maintenance(store, on, message or f"announced by {server}", who=f"server announcement from {server}")
