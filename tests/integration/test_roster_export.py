"""Exact rosters from `dicomgw peers export` (issue 16 §2): A peers with B and with C, B and C only with A. Each
gateway's export (the real CLI on its own queue) is merged with `peers export --merge` and loaded into a real
Prosody (mod_groups) and a real ejabberd 23 (mod_shared_roster via ejabberdctl); then each gateway logs in and
reads its roster: A sees B and C, B sees only A, C sees only A (one group holding all of A's peers let B and
C see each other). A pair only one side lists (B lists D; D's operator exported nothing) is left out and named."""

from __future__ import annotations

import asyncio
import shlex
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from adapters.lab.ejabberd_peer import Ejabberd
from adapters.lab.localpeers import Prosody
from tests.helpers import REPO

DOMAIN = "helsenett.test"
A, B, C, D = (f"radiology.hospital-{x}@{DOMAIN}" for x in "abcd")
PEERS = {A: (B, C), B: (A, D), C: (A,)}
EXPECTED = {A: {B, C}, B: {A}, C: {A}}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "peers", *args, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def exports(tmp_path: Path, server: str) -> tuple[str, str]:
    """Every gateway's own export, then the merge (stdout, stderr)."""
    files = []
    for own, peers in PEERS.items():
        site = tmp_path / own.split("@")[0]
        site.mkdir(parents=True, exist_ok=True)
        config = site / "gateway.toml"
        config.write_text(f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n'
                          f'[queue]\ndb_url = "sqlite:///{site / "queue.db"}"\n[xmpp]\njid = "{own}/gw1"\npassword = "x"\n')
        config.chmod(0o600)
        for peer in peers:
            assert cli(config, "add", peer, "--name", f"Radiology {peer[19].upper()}").returncode == 0
        done = cli(config, "export", server)
        assert done.returncode == 0, done.stderr
        (site / f"roster.{server}").write_text(done.stdout)
        files.append(str(site / f"roster.{server}"))
    merged = cli(tmp_path / "none.toml", "export", server, "--merge", *files, files[0])
    assert merged.returncode == 0, merged.stderr
    return merged.stdout, merged.stderr


def rosters(server: Any) -> dict[str, set[str]]:
    """Each gateway logs in (no presence sent) and reads its roster as the server gives it."""
    async def one(jid: str) -> set[str]:
        client = slixmpp.ClientXMPP(f"{jid}/roster-check", f"pw-{jid.split('@')[0]}")
        client.enable_direct_tls = False
        client.ssl_context = ssl.create_default_context(cafile=str(server.ca_file))
        started = asyncio.Event()
        client.add_event_handler("session_start", lambda _e: started.set())
        client.connect("127.0.0.1", server.c2s_port)
        try:
            await asyncio.wait_for(started.wait(), 30)
            await client.get_roster(timeout=30)
            return {str(item) for item in client.client_roster if str(item) != jid}
        finally:
            client.disconnect()

    async def all_of_them() -> dict[str, set[str]]:
        return {jid: await one(jid) for jid in EXPECTED}

    return asyncio.run(all_of_them())


def test_each_gateway_sees_exactly_its_peers_in_prosody(tmp_path: Path) -> None:
    merged, warned = exports(tmp_path, "prosody")
    assert merged.count("[") == 2  # A+B and A+C; B+D one-sided
    assert f"left out, one-sided pair {B} + {D}" in warned and "read once" in warned
    assert f"{B}=Radiology B" in merged  # the name A gave, not the bare JID
    server = Prosody(tmp_path / "prosody", domain=DOMAIN, groups_text=merged)
    for jid in (A, B, C, D):
        server.add_account(jid.split("@")[0], f"pw-{jid.split('@')[0]}")
    server.start()
    try:
        assert rosters(server) == EXPECTED
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["ejabberd", "ejabberd-roster"])
def test_each_gateway_sees_exactly_its_peers_in_ejabberd(tmp_path: Path, kind: str) -> None:
    """Shared roster groups (``ejabberd``) or the same pairs as roster items (``ejabberd-roster``, for a region)."""
    merged, warned = exports(tmp_path, kind)
    if kind == "ejabberd-roster":
        assert merged.count("add_rosteritem") == 4 and "srg_" not in merged  # A<->B, A<->C, each way
        assert "'Radiology B'" in merged
    assert f"left out, one-sided pair {B} + {D}" in warned
    server = Ejabberd(tmp_path / "ejabberd", domain=DOMAIN)
    server.start()
    try:
        for jid in (A, B, C, D):
            server.add_account(jid.split("@")[0], f"pw-{jid.split('@')[0]}")
        for line in merged.splitlines():  # as the operator runs them
            argv = shlex.split(line)
            assert argv[0] == "ejabberdctl"
            done = server.ctl(*argv[1:])
            assert done.returncode == 0, f"{line}: {done.stdout}{done.stderr}"
        assert rosters(server) == EXPECTED
    finally:
        server.stop()


def test_merge_refuses_hostile_exports_with_the_reason(tmp_path: Path) -> None:
    """Not UTF-8, an injected section, a control character, a truncated command, 1000 garbage lines: each refused,
    nothing printed, exit 1."""
    cases = {
        "latin1.txt": b"[G: a@x.test + b@x.test]\na@x.test=\xe6\xf8\xe5\n",
        "inject.txt": f"[G: {A} + {B}]\n{A}=A\n[Injected]\n{B}=B\nradiology.hospital-z@helsenett.test=E\n".encode(),
        "control.txt": f"[G: {A} + {B}]\n{A}=A\x1b[2J\n{B}=B\n".encode(),
        "garbage.txt": b"\n".join([b"=== not a groups file ==="] * 1000),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        done = cli(tmp_path / "none.toml", "export", "prosody", "--merge", str(tmp_path / name))
        if name == "inject.txt":  # three members in one group: not an export of this version
            assert done.returncode == 1 and "member(s)" in done.stderr and done.stdout == "", done.stderr
        else:
            assert done.returncode == 1 and done.stdout == "", (name, done.stdout, done.stderr)
    (tmp_path / "cut.sh").write_text("ejabberdctl srg_create dicomgw_x helsenett.test 'G: a + b\n")
    done = cli(tmp_path / "none.toml", "export", "ejabberd", "--merge", str(tmp_path / "cut.sh"))
    assert done.returncode == 1 and "cut.sh:1" in done.stderr
