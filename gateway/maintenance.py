"""Maintenance: an admin takes this gateway out of the exchange for a while (``dicomgw maintenance on``).

The switch is a row in ``runtime_status`` (name ``maintenance``) so that the CLI and every running process
of the gateway share it; the running gateway reads it each tick, shows ``dnd`` with the message as its
presence (peers' dispatchers hold their sends to it: ``waiting-peer``) and refuses offers as busy while it
is on. Each switch is audited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.store import QueueStore, utcnow

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
