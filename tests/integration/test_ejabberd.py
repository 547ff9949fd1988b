"""The gateways through ejabberd 23 (Debian) instead of Prosody: the roster from `dicomgw peers export
ejabberd` run as the operator would (shared roster groups), a study over ejabberd's mod_proxy65, and the
server's maintenance announcement (mod_announce) obeyed by every gateway."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.lab.ejabberd_peer import Ejabberd
from adapters.lab.synthetic import generate_ct_study
from gateway.roster import ejabberd_text, pair_groups
from tests.helpers import storescu, wait_for
from tests.integration.test_xmpp_hostile import send_and_check
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    DOMAIN,
    received_instances,
    start_site,
    unit_states,
)

X_JID = f"radiology.hospital-x@{DOMAIN}"


@pytest.fixture
def ejabberd(tmp_path: Path) -> Iterator[Ejabberd]:
    server = Ejabberd(tmp_path / "ejabberd", domain=DOMAIN, admins=(f"ops@{DOMAIN}",))
    server.start()
    try:
        for user in ("radiology.hospital-a", "radiology.hospital-b", "radiology.hospital-x", "ops"):
            server.add_account(user, f"pw-{user}")
        yield server
    finally:
        server.stop()


def test_roster_export_transfer_and_maintenance_announcement_through_ejabberd(tmp_path: Path, ejabberd: Ejabberd) -> None:
    groups = pair_groups("DICOM gateways", A_JID, {B_JID: "Radiology B"})
    for line in ejabberd_text(groups).splitlines():
        argv = shlex.split(line)
        assert argv[0] == "ejabberdctl"
        done = ejabberd.ctl(*argv[1:])
        assert done.returncode == 0, f"{line}: {done.stdout}{done.stderr}"
    members = ejabberd.ctl("srg_get_members", groups[0].group_id, DOMAIN).stdout.split()
    assert sorted(members) == sorted([A_JID, B_JID])

    x = start_site(tmp_path, "x", X_JID, ejabberd, peers=(A_JID,))  # type: ignore[arg-type]
    b = start_site(tmp_path, "b", B_JID, ejabberd, peers=(A_JID,))  # type: ignore[arg-type]
    a = start_site(tmp_path, "a", A_JID, ejabberd, peers=(B_JID,), destination="radiology.hospital-b")  # type: ignore[arg-type]
    try:
        wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == "available", 30, 0.05, what="A to see B")
        assert x.gateway.agent.online and a.gateway.agent.peer_availability(X_JID)[1] == "offline"  # not in the group

        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=20, rows=128, columns=128)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent through ejabberd")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
        assert [(t["method"], t["outcome"]) for t in a.gateway.store.transfers()] == [("s5b", "received")]

        async def announce(body: str, check: object) -> None:
            await send_and_check(ejabberd, "ops", f"{DOMAIN}/announce/online", body, check)

        def both(on: bool) -> None:
            wait_for(lambda: a.gateway._maintenance.on is on and b.gateway._maintenance.on is on, 20, 0.05,
                     what=f"both gateways to have maintenance {'on' if on else 'off'}")

        asyncio.run(announce("dicomgw maintenance on: ejabberd upgrade", lambda: both(True)))
        wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == "busy (maintenance: ejabberd upgrade)", 20, 0.05,
                 what="A to see B's maintenance presence")
        second = generate_ct_study(tmp_path / "ct2", series=1, slices_per_series=3, rows=64, columns=64)
        assert storescu(a.gateway.scp.port, second.files).returncode == 0
        wait_for(lambda: sorted(unit_states(a.gateway)) == ["sent", "waiting-peer"], 20, 0.05, what="A to hold the second study")
        asyncio.run(announce("dicomgw maintenance off", lambda: both(False)))
        wait_for(lambda: unit_states(a.gateway) == ["sent", "sent"], 30, 0.1, what="A to send once maintenance ends")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids) | set(second.sop_instance_uids)
    finally:
        a.stop()
        b.stop()
        x.stop()
