"""Shared test helpers: ports, waiting with deadlines, dcmtk runs, Part-10 data set comparison."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pydicom

from adapters.lab.localpeers import free_port, port_open

__all__ = ["free_port", "port_open"]  # re-exported for the tests

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, what: str | Callable[[], str] = "") -> T:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes (then fail loudly)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {(what() if callable(what) else what) or predicate}")
        time.sleep(interval_s)


@contextlib.contextmanager
def small_file_system(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("2m") at ``mount_point``: a real disk that fills (a remount can grow it). Needs root
    (CI runs as root); anything else is a setup error. Unmounted at the end."""
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def dcmtk_env() -> dict[str, str]:
    """dcmtk leaves Nagle on unless told (see shared/reference/dicom-notes.md)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(args: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s, check=False)


def storescu(port: int, files: list[Path], calling_ae: str = "STORESCU", called_ae: str = "DICOMGW") -> subprocess.CompletedProcess[str]:
    return run_dcmtk(["storescu", "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)])


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its File Meta Information (PS3.10 7.1)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not Part-10"
    pos = 132
    while True:
        group = int.from_bytes(raw[pos : pos + 2], "little")
        if group != 0x0002:
            return raw[pos:]
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            pos += 12 + int.from_bytes(raw[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(raw[pos + 6 : pos + 8], "little")


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


class LoopbackRelay:
    """A loopback TCP relay in front of a real server port: each accepted connection gets its own upstream
    connection and two daemon threads running ``_pump(src, dst, upstream)``; ``stop()`` closes the listener."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: object, dst: object, upstream: bool) -> None:
        raise NotImplementedError  # each relay says what it does with the bytes

    def stop(self) -> None:
        self._listener.close()


class TamperingRelay(LoopbackRelay):
    """For failure tests: the first connection whose upstream passes ``after_bytes`` is cut (``mode='cut'``),
    gets one byte flipped (``mode='flip'``), stalls (``mode='stall'``: its first ``after_bytes`` upstream
    are relayed, then nothing more either way and nothing closed, until ``stop()``: a proxy that hangs) or
    trickles (``mode='trickle'``: then 100 bytes upstream every 0.2 s, taken from the client as long as it
    sends, and its connection held open until ``stop()`` whatever the server does: a hostile proxy);
    every other connection is relayed untouched."""

    def __init__(self, target_port: int, after_bytes: int, mode: str = "cut") -> None:
        import threading

        self.after_bytes = after_bytes
        self.mode = mode
        self.tampered = threading.Event()
        self._stopped = threading.Event()
        super().__init__(target_port)

    def stop(self) -> None:
        self._stopped.set()
        super().stop()

    def _trickle(self, src: object, dst: object, data: bytes) -> None:
        """100 bytes every 0.2 s of what is left, reading more from ``src`` only as it goes (bounded: 300 s)."""
        import time

        pending = bytearray(data)
        deadline = time.monotonic() + 300
        forward = True
        while not self._stopped.is_set() and time.monotonic() < deadline:
            if not pending:
                pending += src.recv(100)  # type: ignore[attr-defined]
                if not pending:
                    return
            if forward:
                try:
                    dst.sendall(bytes(pending[:100]))  # type: ignore[attr-defined]
                except OSError:
                    forward = False  # the server's side is gone: the client's bytes are still taken, slowly
            del pending[:100]
            self._stopped.wait(0.2)

    def _pump(self, src: object, dst: object, upstream: bool) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(1 << 16)  # type: ignore[attr-defined]
                if not data:
                    break
                if upstream and not self.tampered.is_set() and seen + len(data) > self.after_bytes:
                    self.tampered.set()
                    if self.mode == "cut":
                        _drain(dst)  # what already passed reaches the proxy before the cut
                        break
                    if self.mode == "stall":
                        dst.sendall(data[: max(0, self.after_bytes - seen)])  # type: ignore[attr-defined]
                        self._stopped.wait(300)  # bounded: the test stops the relay long before
                        break
                    if self.mode == "trickle":
                        self._trickle(src, dst, data)
                        break
                    index = max(0, self.after_bytes - seen)
                    data = data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]
                seen += len(data)
                dst.sendall(data)  # type: ignore[attr-defined]
        except OSError:
            pass
        finally:
            import socket

            if self.mode == "trickle" and not upstream and self.tampered.is_set():
                self._stopped.wait(300)  # the client's connection stays open (bounded: the test stops the relay)
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]  # wakes the other pump
                except OSError:
                    pass
                sock.close()  # type: ignore[attr-defined]


def _drain(sock: object, timeout_s: float = 10.0) -> None:
    """Half-close ``sock`` and poll until the peer has acknowledged every byte sent (SIOCOUTQ = 0)."""
    import fcntl
    import socket
    import struct
    import termios

    def unacknowledged() -> int:
        fd = sock.fileno()  # type: ignore[attr-defined]
        if fd < 0:  # the other pump closed it: the proxy answered our FIN, so it had every byte
            return 0
        return struct.unpack("I", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]

    sock.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
    wait_for(lambda: unacknowledged() == 0, timeout_s, 0.01, what="the relay's sent bytes to be acknowledged")


class CapturingRelay(LoopbackRelay):
    """Keeps every byte it relays, both ways (what the XMPP server or its proxy could see); ``captured()``.
    Each direction of each connection is kept as its own stream: interleaved, a server's reply could land in the
    middle of one of the client's stanzas (seen: an IBB ack inside a ``<data>`` element)."""

    def __init__(self, target_port: int) -> None:
        import threading

        self._chunks: dict[object, list[bytes]] = {}
        self._lock = threading.Lock()
        super().__init__(target_port)

    def _pump(self, src: object, dst: object, upstream: bool) -> None:
        import socket

        try:
            while data := src.recv(1 << 16):  # type: ignore[attr-defined]
                with self._lock:
                    self._chunks.setdefault(src, []).append(data)
                dst.sendall(data)  # type: ignore[attr-defined]
            dst.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
        except OSError:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
                except OSError:
                    pass

    def captured(self) -> bytes:
        """Every stream in full, one after the other, NUL-separated (no XML or base64 run crosses a NUL)."""
        with self._lock:
            return b"\0\0".join(b"".join(chunks) for chunks in self._chunks.values())
