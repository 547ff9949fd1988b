"""Operations with the real peers: STAT overtaking a routine study on a shared slow line (order of arrival in
Orthanc, audit timestamps, the routine study resumed by offset), the XMPP server's maintenance broadcast
(Prosody's mod_announce) obeyed by every gateway, and the roster exported for Prosody's mod_groups."""

from __future__ import annotations

import asyncio
import json
import shlex
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.lab.localpeers import Orthanc, Prosody
from adapters.lab.netem import FaultRelay, SharedLink
from adapters.lab.synthetic import generate_ct_study
from gateway.roster import ejabberd_text, pair_groups, prosody_text
from gateway.routing import parse_rules
from gateway.settings import PacsSettings, RoutingSettings
from tests.helpers import storescu, wait_for
from tests.integration.test_xmpp_hostile import send_and_check
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    DOMAIN,
    start_site,
    unit_states,
)

STAT_RULE = [{"name": "trauma", "destinations": ["radiology.hospital-b"], "priority": "stat",
              "tags": {"StudyDescription": "re:(?i)trauma"}}]
USERS = ("radiology.hospital-a", "radiology.hospital-b", "radiology.hospital-x", "ops")


def prosody_with(workdir: Path, **options: object) -> Prosody:
    server = Prosody(workdir, domain=DOMAIN, **options)  # type: ignore[arg-type]
    for user in USERS:
        server.add_account(user, f"pw-{user}")
    return server.start()


@pytest.fixture
def prosody(tmp_path: Path) -> Iterator[Prosody]:
    """Prosody with mod_announce; ops@ is its admin."""
    server = prosody_with(tmp_path / "prosody", admins=(f"ops@{DOMAIN}",), modules=("announce",))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["prosody", "ejabberd"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """The STAT test runs through both XMPP servers the gateways support (their proxy65s differ)."""
    if request.param == "prosody":
        server: object = prosody_with(tmp_path / "prosody")
    else:
        from adapters.lab.ejabberd_peer import Ejabberd

        server = Ejabberd(tmp_path / "ejabberd", domain=DOMAIN).start()
        for user in USERS:
            server.add_account(user, f"pw-{user}")
        for line in ejabberd_text(pair_groups("DICOM gateways", A_JID, {B_JID: "B"})).splitlines():  # the roster
            assert server.ctl(*shlex.split(line)[1:]).returncode == 0, line
    try:
        yield server
    finally:
        server.stop()  # type: ignore[attr-defined]


def in_orthanc(orthanc: Orthanc, study_uid: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        found = [m for m in json.loads(response.read()) if m.get("Type") == "Study"]
    return len(orthanc.rest(f"/studies/{found[0]['ID']}/instances")) if found else 0


def moved_at(audit: list[dict], study_uid: str, to_state: str) -> str:
    return min(e["at"] for e in audit if e.get("study_instance_uid") == study_uid and e.get("to_state") == to_state)


def test_stat_overtakes_a_routine_study_on_a_busy_line_and_the_routine_one_resumes(tmp_path: Path, any_server: Prosody) -> None:
    prosody = any_server
    line = SharedLink(2_000_000)  # A's line to the server: 16 Mbit/s, shared by all its proxy connections
    relay = FaultRelay(prosody.proxy_port, link=line)
    with Orthanc(tmp_path / "orthanc") as orthanc:
        orthanc.start()
        pacs = PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, calling_ae_title="GWB",
                            timeout_s=10, retry_base_s=0.2, retry_max_s=0.5)
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), pacs=pacs)
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), s5b_proxy=f"127.0.0.1:{relay.port}", compress=False,
                       routing=RoutingSettings(default_destination="radiology.hospital-b", rules=parse_rules(STAT_RULE)))
        try:
            routine = generate_ct_study(tmp_path / "routine", series=2, slices_per_series=60, rows=256, columns=256, seed=3,
                                        study_description="CT THORAX FOLLOW-UP")
            stat = generate_ct_study(tmp_path / "stat", series=1, slices_per_series=8, rows=256, columns=256, seed=4,
                                     study_description="CT TRAUMA HEAD")
            assert storescu(a.gateway.scp.port, routine.files).returncode == 0

            def routine_streaming() -> bool:
                (unit,) = a.gateway.store.studies()
                return unit.state == "sending" and unit.progress_bytes > unit.bundle_bytes / 5

            wait_for(routine_streaming, 60, 0.05, what=lambda: f"A to stream a fifth of the routine study: {a.gateway.store.studies()} {a.gateway.store.transfers()}")
            assert storescu(a.gateway.scp.port, stat.files).returncode == 0
            wait_for(lambda: in_orthanc(orthanc, stat.study_instance_uid) == len(stat.files), 60, 0.1,
                     what="the STAT study in B's PACS")
            assert in_orthanc(orthanc, routine.study_instance_uid) < len(routine.files)  # STAT arrived first
            wait_for(lambda: in_orthanc(orthanc, routine.study_instance_uid) == len(routine.files), 120, 0.2,
                     what="the routine study in B's PACS")
            wait_for(lambda: unit_states(a.gateway) == ["delivered", "delivered"], 60, 0.1, what="both receipts at A")

            a_audit, b_audit = a.gateway.store.audit_entries(limit=1000), b.gateway.store.audit_entries(limit=1000)
            assert moved_at(a_audit, stat.study_instance_uid, "sent") < moved_at(a_audit, routine.study_instance_uid, "sent")
            assert moved_at(b_audit, stat.study_instance_uid, "delivered") < moved_at(b_audit, routine.study_instance_uid, "delivered")
            by_uid = {s.study_instance_uid: s for s in a.gateway.store.studies()}
            assert (by_uid[stat.study_instance_uid].priority, by_uid[routine.study_instance_uid].priority) == ("stat", "routine")
            attempts = a.gateway.store.transfers(by_uid[routine.study_instance_uid].unit_id)
            assert [t["outcome"] for t in attempts] == ["suspended", "received"]
            assert attempts[1]["offset_bytes"] > 0  # resumed where B was, by range offset
            assert by_uid[routine.study_instance_uid].attempts == 0  # giving way is no failed attempt
            def hashes(site: object) -> dict[str, str]:
                return {i.sop_instance_uid: i.sha256
                        for _u, rows in site.gateway.store.study_units(routine.study_instance_uid) for i in rows}  # type: ignore[attr-defined]

            assert hashes(b) == hashes(a) and set(hashes(a)) == set(routine.sop_instance_uids)  # every byte, once
        finally:
            a.stop()
            b.stop()
            relay.stop()


def test_the_servers_maintenance_broadcast_is_obeyed_by_every_gateway(tmp_path: Path, prosody: Prosody) -> None:
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    text = "XMPP server upgrade 22:00-22:30"

    async def announce(user: str, body: str, to: str, check: object) -> None:
        await send_and_check(prosody, user, to, body, check)

    def both(on: bool) -> None:
        wait_for(lambda: a.gateway._maintenance.on is on and b.gateway._maintenance.on is on, 20, 0.05,
                 what=f"both gateways to have maintenance {'on' if on else 'off'}")

    try:
        # An account that is not the server's admin cannot broadcast, nor switch a gateway by a message.
        asyncio.run(announce("radiology.hospital-x", f"dicomgw maintenance on: {text}", f"{DOMAIN}/announce/online", lambda: None))
        asyncio.run(announce("radiology.hospital-x", f"dicomgw maintenance on: {text}", A_JID, lambda: None))
        asyncio.run(announce("ops", f"dicomgw maintenance on: {text}", f"{DOMAIN}/announce/online", lambda: both(True)))
        assert a.gateway._maintenance.message == text
        wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == f"busy (maintenance: {text})", 20, 0.05,
                 what="A to see B's maintenance presence")
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["waiting-peer"], 20, 0.05, what="A to hold the study")
        assert a.gateway.store.transfers() == []
        switches = [e["detail"] for e in b.gateway.store.audit_entries() if e["event"] == "maintenance"]
        assert switches == [f"maintenance on by server announcement from {DOMAIN}: {text}"]  # not by X's attempts
        asyncio.run(announce("ops", "dicomgw maintenance off", f"{DOMAIN}/announce/online", lambda: both(False)))
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 30, 0.1, what="A to send once maintenance ends")
        asyncio.run(announce("ops", "Maintenance on the roof tomorrow 10:00", f"{DOMAIN}/announce/online",  # a notice, not a switch
                             lambda: wait_for(lambda: any(e["event"] == "server_announcement" for e in a.gateway.store.audit_entries()),
                                              20, 0.05, what="A to audit the other announcement")))
        assert not a.gateway._maintenance.on
    finally:
        a.stop()
        b.stop()


def test_the_exported_roster_is_what_prosody_shares(tmp_path: Path) -> None:
    """`dicomgw peers export prosody` as Prosody's groups_file: A and B see each other online, X (not in it)
    stays invisible to A although it is connected."""
    roster = prosody_text(pair_groups("DICOM gateways", A_JID, {B_JID: "Radiology, Hospital B"}))
    assert roster == f"[DICOM gateways: {A_JID} + {B_JID}]\n{A_JID}={A_JID}\n{B_JID}=Radiology, Hospital B\n"
    server = prosody_with(tmp_path / "prosody", groups_text=roster)
    try:
        x = start_site(tmp_path, "x", f"radiology.hospital-x@{DOMAIN}", server, peers=(A_JID,))
        b = start_site(tmp_path, "b", B_JID, server, peers=(A_JID,))
        a = start_site(tmp_path, "a", A_JID, server, peers=(B_JID,))
        try:
            wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == "available", 20, 0.05, what="A to see B")
            wait_for(lambda: b.gateway.agent.peer_availability(A_JID)[1] == "available", 20, 0.05,
                     what="B to see A (its presence arrives on its own stream, not at the same moment)")
            assert x.gateway.agent.online
            assert a.gateway.agent.peer_availability(f"radiology.hospital-x@{DOMAIN}")[1] == "offline"
        finally:
            a.stop()
            b.stop()
            x.stop()
    finally:
        server.stop()


def test_a_study_routed_to_two_peers_reaches_both_each_unit_on_its_own(tmp_path: Path, prosody: Prosody) -> None:
    x_jid = f"radiology.hospital-x@{DOMAIN}"
    rules = parse_rules([{"name": "ct to b and x", "destinations": ["radiology.hospital-b", "radiology.hospital-x"],
                          "modality": "CT", "calling_ae": "STORESCU"}])
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    x = start_site(tmp_path, "x", x_jid, prosody, peers=(A_JID,), max_inbound=1)
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID, x_jid), routing=RoutingSettings(rules=rules))
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=6, rows=64, columns=64)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent", "sent"], 60, 0.1, what="A to send to both peers")
        units = {s.destination: s for s in a.gateway.store.studies()}
        assert set(units) == {B_JID, x_jid}
        assert units[x_jid].instances_of == units[B_JID].unit_id and units[B_JID].rule == "ct to b and x"
        for site in (b, x):
            (unit,) = site.gateway.store.studies()
            assert (unit.origin_peer, unit.instances) == (A_JID, 6)
            got = {i.sop_instance_uid for _u, rows in site.gateway.store.study_units(study.study_instance_uid) for i in rows}
            assert got == set(study.sop_instance_uids)
        assert {t["peer_jid"].split("/")[0] for t in a.gateway.store.transfers()} == {B_JID, x_jid}
    finally:
        a.stop()
        b.stop()
        x.stop()
