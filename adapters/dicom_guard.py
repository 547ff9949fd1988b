"""Who may wait at the DICOM listeners, and for how long (the SCP's defences against connection floods).

References: dcmtk's ``storescp --fork`` gives each connection its own process, so one address's stalled
connections cost only that address; Orthanc bounds its worker threads. Here, in one process:

- :class:`Admission`: a connection that has not associated yet (reading its A-ASSOCIATE-RQ, or in its TLS
  handshake) takes a *waiting slot* of its listener (``per_listener``: the plain and the TLS port each have
  their own) and of its source address (``per_address``); an associated one takes an *association slot*,
  at most ``max_associations`` in all and ``per_address`` of them from one address. So 64 idle connections
  from one address, or 70 stalled TLS handshakes, fill only that address's share: a modality at another
  address still associates, on either port.
- :class:`Reaper`: one thread that shuts a socket down when its deadline passes (a TLS handshake must finish
  within ``artim_timeout_s``, however slowly its bytes trickle in; a per-read timeout restarts with each
  byte). The thread blocked on the socket then fails and releases its slots.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter


class Admission:
    """Counts of waiting connections per listener and address, and of associations per address (thread-safe)."""

    def __init__(self, per_listener: int, per_address: int, max_associations: int, associations_per_address: int) -> None:
        self.per_listener = per_listener
        self.per_address = per_address
        self.max_associations = max_associations
        self.associations_per_address = associations_per_address
        self._waiting_listener: Counter[str] = Counter()
        self._waiting_address: Counter[str] = Counter()
        self._associations: Counter[str] = Counter()
        self._lock = threading.Lock()

    def wait(self, listener: str, address: str) -> str | None:
        """Take a waiting slot: None when taken, else why not (the connection is closed at once)."""
        with self._lock:
            if self._waiting_listener[listener] >= self.per_listener:
                return f"{self.per_listener} connections on the {listener} port have not associated yet"
            if self._waiting_address[address] >= self.per_address:
                return f"{self.per_address} connections from {address} have not associated yet"
            self._waiting_listener[listener] += 1
            self._waiting_address[address] += 1
            return None

    def done_waiting(self, listener: str, address: str) -> None:
        with self._lock:
            self._waiting_listener[listener] -= 1
            self._waiting_address[address] -= 1
            if self._waiting_address[address] <= 0:
                del self._waiting_address[address]

    def associate(self, address: str) -> str | None:
        """Take an association slot: None when taken, else why not (answered 'local limit exceeded')."""
        with self._lock:
            if sum(self._associations.values()) >= self.max_associations:
                return f"{self.max_associations} associations already open"
            if self._associations[address] >= self.associations_per_address:
                return f"{self.associations_per_address} associations from {address} already open"
            self._associations[address] += 1
            return None

    def release(self, address: str) -> None:
        with self._lock:
            self._associations[address] -= 1
            if self._associations[address] <= 0:
                del self._associations[address]

    @property
    def associations(self) -> int:
        with self._lock:
            return sum(self._associations.values())


class Reaper:
    """Shuts sockets down at their deadlines (one daemon thread, started on first use, checking 4x a second)."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._deadlines[sock] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dicom-deadlines", daemon=True)
                self._thread.start()

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            now = time.monotonic()
            with self._lock:
                expired = [s for s, deadline in self._deadlines.items() if deadline <= now]
                for sock in expired:
                    del self._deadlines[sock]
            for sock in expired:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
