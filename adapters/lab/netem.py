"""An emulated network for tests and benchmarks: a TCP relay on loopback that adds what real links have.

:class:`FaultRelay` listens on 127.0.0.1 and forwards each connection to ``target_port``, applying per
direction: a one-way ``latency_s`` (each piece is delivered that long after it was read, so a round trip
costs twice it), a ``rate_bytes_s`` cap (the link rate of *each* connection and direction: a piece leaves once the line has
carried the ones before it, counted from when it reached the line, so the relay's own late wake-ups do not
slow the line),
and faults on the client->server direction: ``stall_after``/``stall_s`` (the link goes quiet), ``cut_after``
(both sides closed after that many bytes, once) and ``reset_after`` (an RST instead of a FIN). With a
:class:`SharedLink` the rate is that of one link that all connections of the relays given it share (per
direction), as a site's line is shared by its XMPP session and its streams; otherwise each connection has a
link of its own. ``faults``
counts what was injected. Point a gateway's ``[xmpp] port`` and ``s5b_proxy`` at relays to put it behind
the emulated link. Threads only; every socket is closed by :meth:`stop`.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time

PIECE_BYTES = 1 << 16


class SharedLink:
    """One line of ``rate_bytes_s`` per direction: pieces take their turn on it in the order they come."""

    def __init__(self, rate_bytes_s: float) -> None:
        self.rate_bytes_s = rate_bytes_s
        self._free_at = {True: 0.0, False: 0.0}
        self._lock = threading.Lock()

    def turn(self, upstream: bool, size: int, ready_at: float) -> float:
        """When a piece of ``size`` bytes has left, if it reached the line at ``ready_at`` (monotonic time)."""
        with self._lock:
            self._free_at[upstream] = max(self._free_at[upstream], ready_at) + size / self.rate_bytes_s
            return self._free_at[upstream]


class FaultRelay:
    def __init__(self, target_port: int, latency_s: float = 0.0, rate_bytes_s: float = 0.0,
                 stall_after: int = 0, stall_s: float = 0.0, cut_after: int = 0, reset_after: int = 0,
                 link: SharedLink | None = None) -> None:
        self.target_port = target_port
        self.link = link
        if link is not None:
            rate_bytes_s = link.rate_bytes_s
        self.latency_s = latency_s
        self.rate_bytes_s = rate_bytes_s
        self.stall_after, self.stall_s = stall_after, stall_s
        self.cut_after, self.reset_after = cut_after, reset_after
        self.faults: collections.Counter[str] = collections.Counter()
        self.bytes_up = 0
        self._fired: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fault-relay", daemon=True)
        self._thread.start()

    def configure(self, **changes: float) -> None:
        """Change the link for connections made from now on (and the rate of running ones)."""
        for name, value in changes.items():
            setattr(self, name, value)
        with self._lock:
            self._fired.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread.join(5)

    # -- relaying ---------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._direction, args=(src, dst, up), daemon=True).start()

    def _direction(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        """Read into a queue stamped with arrival time; a writer delivers after the latency, at the rate."""
        pieces: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()
        done = [False]
        # What the "wire" holds: the bandwidth-delay product plus a small router buffer. A full wire stops
        # reading, so TCP back-pressure reaches the sender as on a real link.
        window = (self.rate_bytes_s * self.latency_s + (1 << 18)) if self.rate_bytes_s > 0 else (8 << 20)
        writer = threading.Thread(target=self._deliver, args=(pieces, ready, done, src, dst, upstream), daemon=True)
        writer.start()
        try:
            while not self._stopping.is_set():
                data = src.recv(PIECE_BYTES)
                if not data:
                    break  # a FIN: passed on as a half-close once the wire is drained
                with ready:
                    pieces.append((time.monotonic(), data))
                    ready.notify()
                    while sum(len(p) for _t, p in pieces) > window and not self._stopping.is_set():
                        ready.wait(0.5)
        except OSError:  # a reset: the far side learns it as on a real path
            _abort(src, dst)
        with ready:
            done[0] = True
            ready.notify()
        writer.join()

    def _deliver(self, pieces: collections.deque[tuple[float, bytes]], ready: threading.Condition, done: list[bool],
                 src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        moved = 0
        budget_at = time.monotonic()
        try:
            while True:
                with ready:
                    while not pieces and not done[0]:
                        ready.wait(0.5)
                    if not pieces:
                        break
                    stamp, data = pieces.popleft()
                    ready.notify()  # room on the wire: the reader may go on
                wait = stamp + self.latency_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if upstream and self._fault(moved, len(data), src, dst):
                    return
                if self.link is not None:  # the piece takes its turn on the one line
                    if (lag := self.link.turn(upstream, len(data), stamp + self.latency_s) - time.monotonic()) > 0:
                        time.sleep(lag)
                elif self.rate_bytes_s > 0:  # the line carries this piece after the last one, from the moment it
                    # reached the line (its arrival plus the delay): when this thread wakes late, the line had been
                    # sending meanwhile, as a real one does, instead of charging the emulator's lateness to the link
                    budget_at = max(budget_at, stamp + self.latency_s) + len(data) / self.rate_bytes_s
                    if (lag := budget_at - time.monotonic()) > 0:
                        time.sleep(lag)
                dst.sendall(data)
                moved += len(data)
                if upstream:
                    with self._lock:
                        self.bytes_up += len(data)
        except OSError:  # the receiving side is gone (reset, killed): so is the connection, both ways
            _abort(src, dst)
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _once(self, name: str) -> bool:
        with self._lock:
            if name in self._fired:
                return False
            self._fired.add(name)
            self.faults[name] += 1
            return True

    def _fault(self, moved: int, size: int, src: socket.socket, dst: socket.socket) -> bool:
        """Apply a due fault before this piece; True when the connection is gone."""
        end = moved + size
        if self.stall_after and moved < self.stall_after <= end and self._once("stall"):
            time.sleep(self.stall_s)
        if self.cut_after and moved < self.cut_after <= end and self._once("cut"):
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            return True
        if self.reset_after and moved < self.reset_after <= end and self._once("reset"):
            _abort(src, dst)
            return True
        return False


def _abort(*sockets: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a dead host's kernel or a failed middlebox would."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.close()
