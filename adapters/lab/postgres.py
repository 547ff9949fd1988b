"""A PostgreSQL of its own for a test that stops and starts it under a running gateway (Debian's binaries,
``initdb`` into a temporary directory, loopback only, fsync off). As root, the server runs as the ``postgres``
user, as ``.ci/test``'s shared one does. It is stopped by the PID in its ``postmaster.pid``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from adapters.lab.localpeers import free_port, port_open


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (bash .ci/setup installs it)")
    return found[-1]


class PrivatePostgres:
    """Its directory is its own under /tmp (the ``postgres`` user cannot enter a test's temporary directory as
    root makes it); :meth:`remove` deletes it once stopped."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="dicomgw-pg-"))
        self.data = self.workdir / "data"
        self.port = free_port()
        self._bin = _bin_dir()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(self._bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.workdir / "log"), "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.workdir} -c fsync=off", "start")
        deadline = time.monotonic() + 60
        while not port_open(self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL not answering on {self.port}; log: {self.workdir / 'log'}")
            time.sleep(0.05)
        return self

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stopped at once, as a crash or a failover would (SIGQUIT: immediate shutdown), by its PID."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    def read_only(self, on: bool = True) -> None:
        """Every session read-only (``default_transaction_read_only``, taken by open sessions at the reload), as
        a failover to a standby leaves a gateway's URL; ``on`` False makes it writable again."""
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            if on:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        # In effect on return: the server reloads asynchronously; once a new session sees the setting, the server
        # has signalled every open session too, which takes it before its next statement.
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SHOW default_transaction_read_only").fetchone()
            if row is not None and (row[0] == "on") == on:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port}: default_transaction_read_only still not {on}")
            time.sleep(0.02)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running (a zombie no one has reaped yet is not: pg_ctl's server is not our child)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
