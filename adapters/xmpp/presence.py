"""Presence as two components the agent holds (issue 18 §5): what the peers show (``PeerPresence``) and what we
show (``FlowControl``).

``PeerPresence``: every peer resource's ``show`` and status text from the presence stanzas the server relays (our
roster is exactly our peers, ``gateway.roster``), and what that means for an offer (``availability``).

``FlowControl``: our presence is flow control (``dnd`` with a status text at the inbound limit or in maintenance,
available otherwise). A gateway near its limit would flip it with every transfer that starts or ends, and each flip
goes to every peer on the roster (a regional hub has hundreds): changes are coalesced to at most one presence per
``min_interval_s``; a change inside the interval is sent when it ends, and only if it still differs from what the
peers last saw. So each peer receives at most one flow-control presence per interval from a gateway, however busy
(the presence that opens a session is not counted: a state decided right after the login goes out at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.terminal import plain

AVAILABLE_SHOWS = ("available", "", "chat", "away", "dnd", "xa")
STATUS_CHARS = 200  # of a peer's status text kept: it reaches the sender's queue as the reason it waits


def one_line(status: str | None) -> str:
    """A peer's status text as the queue may show it: no control or direction characters (``gateway.terminal``),
    on one line (whitespace and separators collapsed), at most ``STATUS_CHARS``."""
    return " ".join(plain((status or "")[: 4 * STATUS_CHARS]).split())[:STATUS_CHARS]


class PeerPresence:
    """bare JID -> {resource: show} and {resource: status text}, from the presence stanzas we receive."""

    def __init__(self) -> None:
        self.show: dict[str, dict[str, str]] = {}
        self.text: dict[str, dict[str, str]] = {}
        self.received = 0  # presence stanzas from others since start (bench/region reads it)

    def clear(self) -> None:
        """The session ended: nothing is known until the server sends presence again."""
        self.show.clear()
        self.text.clear()

    def update(self, bare: str, resource: str, kind: str, show: str, status: str) -> None:
        self.received += 1
        resources = self.show.setdefault(bare, {})
        if kind == "unavailable":
            resources.pop(resource, None)
        elif kind in AVAILABLE_SHOWS:
            resources[resource] = show or "available"
            self.text.setdefault(bare, {})[resource] = one_line(status)

    def online_resource(self, bare: str) -> str | None:
        """A full JID of the peer if any of its resources is online (busy or not)."""
        resources = sorted(self.show.get(bare, {}))
        return f"{bare}/{resources[0]}" if resources else None

    def availability(self, bare: str, priority: str = "routine") -> tuple[str | None, str]:
        """(full JID to offer to, or None; 'available' | 'busy' | 'offline'). A STAT study is offered to a peer busy
        at its inbound limit (it keeps room for STAT), not to one in maintenance."""
        resources = self.show.get(bare, {})
        free = sorted(r for r, show in resources.items() if show in ("available", "chat"))
        if free:
            return f"{bare}/{free[0]}", "available"
        if not resources:
            return None, "offline"
        text = next((t for r, t in sorted(self.text.get(bare, {}).items()) if r in resources and t), "")
        if priority == "stat" and not text.startswith("maintenance"):
            return f"{bare}/{sorted(resources)[0]}", "busy (STAT offered into its reserved room)"
        if text.startswith("busy: ") and len(text) > len("busy: "):  # why, in the peer's words (its spool, its limit)
            return None, f"busy ({text[len('busy: '):]})"
        return None, f"busy ({text})" if text.startswith("maintenance") else "busy"


class FlowControl:
    """What we show, sent through ``send(show, status)`` at most once per ``min_interval_s`` (see the module)."""

    def __init__(self, send: Callable[[str | None, str], None], min_interval_s: float,
                 call_later: Callable[[float, Callable[[], None]], Any], clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self.min_interval_s = min_interval_s
        self._call_later = call_later
        self._clock = clock
        self.wanted: tuple[str | None, str] = (None, "ready")
        self.shown: tuple[str | None, str] | None = None  # what the peers last got in this session
        self._last_sent = float("-inf")
        self._pending: Any = None
        self.sent = 0  # presence stanzas we broadcast (bench/region reads it)

    def set(self, busy: bool, status: str, online: bool) -> None:
        self.wanted = ("dnd" if busy else None, status)
        if online:
            self._maybe_send()

    def session_started(self) -> None:
        """A new session: the server knows nothing of us, the current state goes out at once; it does not count
        against the interval (a change right after the login, e.g. full at start, goes out at once too)."""
        self.shown = None
        self._cancel()
        self._send_now()
        self._last_sent = float("-inf")

    def session_ended(self) -> None:
        self.shown = None
        self._cancel()

    def _maybe_send(self) -> None:
        if self.wanted == self.shown or self._pending is not None:
            return  # nothing new, or a send is already due at the end of the interval
        wait = self._last_sent + self.min_interval_s - self._clock()
        if wait <= 0:
            self._send_now()
        else:
            self._pending = self._call_later(wait, self._due)

    def _due(self) -> None:
        self._pending = None
        if self.shown is not None and self.wanted != self.shown:
            self._send_now()

    def _send_now(self) -> None:
        self._last_sent = self._clock()
        self.shown = self.wanted
        self.sent += 1
        self._send(*self.wanted)

    def _cancel(self) -> None:
        if self._pending is not None:
            cancel = getattr(self._pending, "cancel", None)
            if cancel is not None:
                cancel()
            self._pending = None
