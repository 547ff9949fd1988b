"""Which gateway processes run: one heartbeat row per process, read by `dicomgw status`, the web page and
``/metrics`` alike, so that none of them can say "online" for a process that has stopped.

Each ``dicomgw run`` writes ``runtime_status`` row ``process:<owner>`` every ``BEAT_S`` seconds from a thread of
its own: host, PID, start time, its listeners (DICOM SCP, web page, watched folder) and its XMPP connection as
it is now. A clean stop writes ``stopped_at`` and the exit code. A process counts as *running* while its last
beat is younger than ``STALE_S`` and, on this host, its PID is alive; a SIGKILLed one is "not running, last
heard N s ago" with no exit code. Rows of processes stopped more than ``KEEP_STOPPED_S`` ago are dropped at
the next start.

A process whose beat is stale while its PID still runs on this host (the same process: it started when its row
says) is *silent*, not "killed or lost": its queue database takes no writes (a full disk, a read-only standby),
or it hangs. Saying it had been killed would send an admin to restart a process that is running.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from gateway.claims import local_pid, owner_gone_here, pid_runs

PREFIX = "process:"
BEAT_S = 5.0
STALE_S = 30.0  # six missed beats: a loaded 2-CPU box delays a beat by seconds, never by half a minute
KEEP_STOPPED_S = 7 * 86400.0


class StatusRows(Protocol):
    def set_runtime_status(self, name: str, value: str) -> None: ...
    def runtime_statuses(self, prefix: str) -> list[tuple[str, str, datetime]]: ...
    def drop_runtime_status(self, names: list[str]) -> None: ...


@dataclass
class ProcessView:
    """One process as the heartbeat rows show it."""

    owner: str
    running: bool
    last_heartbeat_at: datetime
    last_heard_s: float
    started_at: str = ""
    stopped_at: str | None = None
    exit_code: int | None = None
    exit_reason: str = ""
    listeners: dict[str, Any] = field(default_factory=dict)
    xmpp: dict[str, Any] = field(default_factory=dict)
    silent: bool = False  # its beat is stale but its PID runs on this host
    pid: str = ""

    @property
    def summary(self) -> str:
        """``running`` / ``not running (last heard 42 s ago, exit 0)`` for a status line."""
        if self.running:
            return "running"
        if self.silent:
            return (f"SILENT: its process (PID {self.pid}) runs on this host but has written no heartbeat for "
                    f"{_age(self.last_heard_s)}: it cannot write to the queue database (a full disk, a read-only "
                    "database; see its log), or it hangs")
        ended = (f"exit {self.exit_code}" + (f": {self.exit_reason}" if self.exit_reason else "")
                 if self.exit_code is not None else "no clean exit: killed or lost")
        return f"not running (last heard {_age(self.last_heard_s)} ago, {ended})"

    def as_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "running": self.running,
                "last_heartbeat_at": self.last_heartbeat_at.isoformat(timespec="seconds"),
                "last_heard_s": round(self.last_heard_s, 1), "started_at": self.started_at,
                "stopped_at": self.stopped_at, "exit_code": self.exit_code, "exit_reason": self.exit_reason,
                "listeners": self.listeners, "xmpp": self.xmpp, "silent": self.silent}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Heartbeat:
    """This process's row: ``beat()`` on a timer, ``stopped(code)`` at the end (thread-safe: one write each)."""

    def __init__(self, rows: StatusRows, owner: str, now: Callable[[], datetime]) -> None:
        self.rows, self.owner, self.now = rows, owner, now
        self.started_at = now().isoformat(timespec="seconds")

    def beat(self, described: dict[str, Any]) -> None:
        """``described``: the process's ``listeners`` and ``xmpp`` as they are now."""
        self._write(described, {"stopped_at": None, "exit_code": None})

    def stopped(self, described: dict[str, Any], exit_code: int, reason: str = "") -> None:
        self._write(described, {"stopped_at": self.now().isoformat(timespec="seconds"), "exit_code": exit_code,
                                "exit_reason": reason[:300]})

    def prune(self) -> int:
        """Drop rows of processes that stopped (or went silent) more than ``KEEP_STOPPED_S`` ago."""
        old = [row_name(v.owner) for v in processes(self.rows, self.now())
               if not v.running and v.last_heard_s > KEEP_STOPPED_S]
        if old:
            self.rows.drop_runtime_status(old)
        return len(old)

    def _write(self, described: dict[str, Any], end: dict[str, Any]) -> None:
        host, _, rest = self.owner.partition(":")
        value = {"owner": self.owner, "host": host, "pid": rest.partition(":")[0], "started_at": self.started_at,
                 **described, **end}
        self.rows.set_runtime_status(row_name(self.owner), json.dumps(value, default=str))


def row_name(owner: str) -> str:
    """``process:<pid>:<random>`` (the row's name holds 64 characters; the host is in the value)."""
    return PREFIX + ":".join(owner.split(":")[-2:])


def alive_here(owner: str, started_at: str) -> bool:
    """Whether ``owner`` names a process that runs on this host now and started when its row says (a PID used
    again by another program after a restart does not count)."""
    pid = local_pid(owner)
    if pid is None or not pid_runs(pid):
        return False
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # starttime, field 22
        booted = time.time() - float(Path("/proc/uptime").read_text().split()[0])
        began = booted + ticks / os.sysconf("SC_CLK_TCK")
        row_began = (datetime.fromisoformat(started_at).replace(tzinfo=UTC).timestamp()  # naive UTC (gateway.rows)
                     if started_at else None)
    except (OSError, ValueError, IndexError):
        return True  # no /proc to ask: the PID runs, which is what owner_gone_here goes by too
    # The row's start is written once the process has imported its modules and opened its database: a few
    # seconds after the process began, more on a loaded machine; never before it.
    return row_began is None or row_began - 300 <= began <= row_began + 5


def processes(rows: StatusRows, now: datetime, stale_s: float = STALE_S,
              gone: Callable[[str], bool] = owner_gone_here,
              alive: Callable[[str, str], bool] = alive_here) -> list[ProcessView]:
    """Every process that has beaten, running ones first, newest beat first within each."""
    views = []
    for name, value, updated_at in rows.runtime_statuses(PREFIX):
        try:
            data = json.loads(value)
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        owner = str(data.get("owner") or name[len(PREFIX):])
        age = max(0.0, (now - updated_at).total_seconds())
        exit_code = data.get("exit_code")
        running = exit_code is None and age < stale_s and not gone(owner)
        started_at = str(data.get("started_at") or "")
        silent = exit_code is None and not running and alive(owner, started_at)
        views.append(ProcessView(
            owner=owner, running=running, last_heartbeat_at=updated_at, last_heard_s=age,
            started_at=str(data.get("started_at") or ""), stopped_at=data.get("stopped_at"),
            exit_code=exit_code if isinstance(exit_code, int) else None, exit_reason=str(data.get("exit_reason") or ""),
            listeners=data.get("listeners") if isinstance(data.get("listeners"), dict) else {},
            xmpp=data.get("xmpp") if isinstance(data.get("xmpp"), dict) else {},
            silent=silent, pid=str(data.get("pid") or owner.partition(":")[2].partition(":")[0])[:20],
        ))
    views.sort(key=lambda v: (not v.running, not v.silent, v.last_heard_s))
    return views


@dataclass
class Overall:
    """What `dicomgw status` answers with: is anything running, and is XMPP online in a running process."""

    running: bool
    last_heartbeat_at: datetime | None
    xmpp: dict[str, Any]
    processes: list[ProcessView]

    @property
    def silent(self) -> list[ProcessView]:
        """Processes that run on this host but write no heartbeat."""
        return [v for v in self.processes if v.silent]

    @property
    def xmpp_online(self) -> bool:
        return self.xmpp.get("state") == "online"


def overall(rows: StatusRows, now: datetime, stale_s: float = STALE_S,
            gone: Callable[[str], bool] = owner_gone_here,
            alive: Callable[[str, str], bool] = alive_here) -> Overall:
    views = processes(rows, now, stale_s, gone, alive)
    live = [v for v in views if v.running]
    # The XMPP connection of a running process (online first); a stopped process's last state is history.
    with_xmpp = sorted((v for v in live if v.xmpp), key=lambda v: v.xmpp.get("state") != "online")
    xmpp = dict(with_xmpp[0].xmpp) if with_xmpp else {}
    if not xmpp and views and any(v.xmpp for v in views):
        xmpp = {"state": "not running"}
    return Overall(running=bool(live), last_heartbeat_at=max((v.last_heartbeat_at for v in views), default=None),
                   xmpp=xmpp, processes=views)
