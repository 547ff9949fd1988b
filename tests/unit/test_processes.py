"""Heartbeat rows read back as running / not running (gateway.processes), with fake rows and a fixed clock."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from gateway.processes import KEEP_STOPPED_S, STALE_S, Heartbeat, overall, processes

NOW = datetime(2026, 11, 30, 12, 0, 0)


class Rows:
    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, datetime]] = {}
        self.clock = NOW

    def set_runtime_status(self, name: str, value: str) -> None:
        self.rows[name] = (value, self.clock)

    def runtime_statuses(self, prefix: str) -> list[tuple[str, str, datetime]]:
        return [(n, v, at) for n, (v, at) in self.rows.items() if n.startswith(prefix)]

    def drop_runtime_status(self, names: list[str]) -> None:
        for name in names:
            self.rows.pop(name, None)


ONLINE = {"listeners": {"dicom": "127.0.0.1:11112"}, "xmpp": {"state": "online", "server": "x:5222"}}


def test_a_beating_process_runs_until_its_beats_stop() -> None:
    rows = Rows()
    beat = Heartbeat(rows, "host:123:abcd", lambda: rows.clock)
    beat.beat(ONLINE)
    found = overall(rows, NOW + timedelta(seconds=STALE_S - 1), gone=lambda _o: False)
    assert found.running and found.xmpp_online and found.processes[0].summary == "running"
    later = overall(rows, NOW + timedelta(seconds=STALE_S + 1), gone=lambda _o: False)
    assert not later.running and not later.xmpp_online and later.xmpp == {"state": "not running"}
    assert later.processes[0].summary.startswith("not running (last heard 31 s ago, no clean exit")


def test_a_dead_pid_is_not_running_at_once_and_a_clean_stop_has_its_exit_code() -> None:
    rows = Rows()
    beat = Heartbeat(rows, "host:123:abcd", lambda: rows.clock)
    beat.beat(ONLINE)
    assert not overall(rows, NOW, gone=lambda _o: True).running
    beat.stopped(ONLINE, 1, "OSError: port in use")
    (view,) = processes(rows, NOW + timedelta(seconds=5), gone=lambda _o: False)
    assert not view.running and view.exit_code == 1 and "exit 1: OSError: port in use" in view.summary


def test_running_processes_first_and_old_stopped_rows_pruned() -> None:
    rows = Rows()
    old = Heartbeat(rows, "host:1:old", lambda: rows.clock)
    old.stopped({}, 0)
    rows.clock = NOW + timedelta(seconds=KEEP_STOPPED_S + 10)
    new = Heartbeat(rows, "host:2:new", lambda: rows.clock)
    new.beat(ONLINE)
    views = processes(rows, rows.clock, gone=lambda _o: False)
    assert [v.owner for v in views] == ["host:2:new", "host:1:old"]
    assert new.prune() == 1 and [v.owner for v in processes(rows, rows.clock, gone=lambda _o: False)] == ["host:2:new"]


def test_a_row_that_is_not_json_is_shown_not_fatal() -> None:
    rows = Rows()
    rows.set_runtime_status("process:9:zz", "{not json")
    rows.set_runtime_status("process:8:yy", json.dumps([1, 2]))
    assert len(processes(rows, NOW, gone=lambda _o: False)) == 2


def test_a_stale_process_whose_pid_runs_here_is_silent_not_killed_or_lost() -> None:
    """A process that runs but writes no heartbeat (its queue database full or read-only) is said to run and be
    silent, so that an admin looks at its database rather than restarting it; a PID that runs but is another
    program (it started after the row's process) is not that process."""
    import os
    import socket
    import subprocess

    from gateway.processes import alive_here
    from gateway.rows import utcnow

    rows = Rows()
    beat = Heartbeat(rows, f"{socket.gethostname()}:{os.getpid()}:abcd", lambda: rows.clock)
    beat.beat(ONLINE)
    later = overall(rows, NOW + timedelta(seconds=STALE_S + 35), gone=lambda _o: False, alive=lambda _o, _s: True)
    (view,) = later.processes
    assert not later.running and later.silent == [view] and view.silent and view.as_json()["silent"] is True
    assert view.summary.startswith(f"SILENT: its process (PID {os.getpid()}) runs on this host but has written no "
                                   "heartbeat for 65 s: it cannot write to the queue database"), view.summary
    gone = overall(rows, NOW + timedelta(seconds=STALE_S + 35), gone=lambda _o: False, alive=lambda _o, _s: False)
    assert not gone.silent and gone.processes[0].summary.startswith("not running (last heard 65 s ago, no clean exit")
    beat.stopped(ONLINE, 0)
    stopped = overall(rows, NOW + timedelta(seconds=STALE_S + 35), gone=lambda _o: False, alive=lambda _o, _s: True)
    assert not stopped.silent  # a clean exit is an exit, whatever runs under its PID now
    # A process that began just now, as a gateway writes its row at its start (this test's own process may have
    # begun many minutes before: a long test session).
    child = subprocess.Popen(["sleep", "120"])
    try:
        here = f"{socket.gethostname()}:{child.pid}:abcd"
        assert alive_here(here, utcnow().isoformat(timespec="seconds"))
        assert not alive_here(here, "2020-01-01T00:00:00")  # this PID's process began years after that row's
        assert not alive_here(f"elsewhere:{child.pid}:abcd", utcnow().isoformat(timespec="seconds"))
    finally:
        child.kill()
        child.wait(30)
    assert not alive_here(here, utcnow().isoformat(timespec="seconds"))  # ended
