"""The peers this gateway exchanges studies with, held in memory for the XMPP edge.

Every offer, verdict and receipt asks "is this sender a peer, which certificate is pinned for it": under a
flood that must not cost a database read on the event loop. :class:`PeerDirectory` keeps a snapshot of the
admin's peer table (``dicomgw peers``) merged with the TOML file's ``peers`` and pins; :meth:`refresh`
re-reads it (a worker thread calls it every second, and at once, at most once a second, when an unknown
sender is seen, so a peer added by another process is known within about a second). Lookups are dict reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gateway.model import PeerConfig

NOTED_S = 10.0  # far longer than a write to the queue and the next refresh (every second)


class PeerDirectory:
    def __init__(self, read: Callable[[], dict[str, PeerConfig]], configured_peers: tuple[str, ...] = (),
                 configured_pin: Callable[[str], str | None] = lambda _jid: None,
                 read_signing: Callable[[], dict[str, str]] = dict) -> None:
        self._read = read
        self._read_signing = read_signing
        self.configured_peers = configured_peers
        self._configured_pin = configured_pin
        self._peers: dict[str, PeerConfig] = {}
        self._signing: dict[str, str] = {}  # peer -> our identity it pins (the queue's peer_signing table)
        self._noted: dict[str, tuple[str, float]] = {}  # what this process was told, until its write is read back
        self._read_at = 0.0
        self._refreshing = threading.Lock()

    def refresh(self) -> None:
        """Re-read the peer table (blocking: call it off the event loop)."""
        if not self._refreshing.acquire(blocking=False):
            return  # one refresh at a time; the running one is as fresh
        try:
            self._peers = dict(self._read())  # one reference swap: readers see the old or the new snapshot
            self._signing = dict(self._read_signing())
            self._read_at = time.monotonic()
        finally:
            self._refreshing.release()

    def refresh_soon(self) -> None:
        """Refresh on a thread of its own, now (any thread; returns at once; skipped while one runs)."""
        if not self._refreshing.locked():
            self._read_at = time.monotonic()  # callers in the next second see it fresh: one thread, not one per call
            threading.Thread(target=self.refresh, name="peer-directory", daemon=True).start()

    def stale(self, max_age_s: float = 1.0) -> bool:
        return time.monotonic() - self._read_at > max_age_s

    def config(self, jid: str) -> PeerConfig | None:
        return self._peers.get(jid)

    def allowed(self, jid: str) -> bool:
        config = self._peers.get(jid)
        return jid in self.configured_peers or (config is not None and config.allowed)

    def signing(self, jid: str) -> str | None:
        """The fingerprint of our identity ``jid`` pins, as its last completed exchange (with any process of the site)
        showed:
        what this process was told in the last ``NOTED_S`` (its write may not be read back yet), else the table."""
        noted = self._noted.get(jid)
        if noted is not None and time.monotonic() - noted[1] < NOTED_S:
            return noted[0]
        return self._signing.get(jid)

    def note_signing(self, jid: str, fingerprint: str) -> bool:
        """An exchange with ``jid`` completed under this identity of ours; True if the table does not say so yet
        (the caller writes it)."""
        self._noted[jid] = (fingerprint, time.monotonic())
        return self._signing.get(jid) != fingerprint

    def pin(self, jid: str) -> str | None:
        """The pinned certificate fingerprint: `dicomgw peers add --fingerprint` first, then the TOML file."""
        config = self._peers.get(jid)
        if config is not None and config.allowed and config.fingerprint:
            return config.fingerprint
        return self._configured_pin(jid)
