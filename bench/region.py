"""An emulated region (issue 18 §1): ``bash bench/region [--sites 50,200,500] [--peers-per-site 4] [--server both]
[--quick]``.

N gateway sites on one XMPP service: an ejabberd 23 cluster of two nodes on loopback (127.0.0.1 and 127.0.0.2, Erlang
distribution, ``join_cluster``, a proxy65 on each; sites spread over both, each with both nodes in its server list),
and Prosody 0.12 for comparison. Every site is a light simulated gateway in this process (slixmpp clients that behave
as ours do on the wire: STARTTLS verified, SCRAM, the roster, presence as flow control through the gateway's own
``adapters.xmpp.presence.FlowControl`` (``dnd`` at the limit, at most one presence per 2 s), offers answered
``not-acceptable``). Rosters are what a region's operator loads: each site's ``dicomgw peers export`` (one pair group
per peer: K random sites and the regional hub) merged with ``gateway.roster.merge``; into ejabberd as roster items
(``peers export ejabberd-roster``: ``add_rosteritem`` both ways; ``--ejabberd-roster srg`` loads the shared roster groups
of ``peers export ejabberd`` instead, whose login cost grows with every pair of the region), sent through mod_http_api
instead of one ``ejabberdctl`` VM each; into Prosody as its groups file.

Measured per server and N (printed as a table, then one JSON line):
- ``login_storm_s``: every site connects at once; seconds until the last session is up;
- ``presence_per_gateway_min``: presence stanzas an ordinary site receives per minute while the region churns (every
  0.5 s 5 % of the sites flip flow control; every 5 s 1 % drop their connection and come back), median over sites;
  ``hub_presence_min`` the hub's (it peers with every site);
- ``presence_per_change``: stanzas the whole region receives for one flow-control change of one ordinary site
  (quiet region);
- ``server_rss_mb`` (RSS of the server processes after the login; ``server_rss_mb_per_100``: what 100 more sites add,
  from the smallest to the largest N) and ``server_cpu_s_per_min_per_100`` (their CPU time during the churn);
- ``failover_s`` (ejabberd): node 1 is SIGKILLed; seconds until every site it carried is online on node 2;
- ``study_busy_vs_idle``: two real ``dicomgw run`` gateways (on node 2 for ejabberd; the proxy65 variant a site deploys
  for Prosody) with Orthanc behind B move a fresh ~60 MB CT study (``--study-slices``; 40 slices with ``--quick``) from
  dcmtk's storescu to B's PACS: seconds from the last C-STORE response to A's unit ``delivered`` (B's receipt), the
  median of ``--study-runs`` (3) studies on the idle server before the sites log in and of as many while the region
  churns (the churn lasts until they are through); every SOP Instance UID checked in Orthanc.
  ``cpu_cores_during_churn``: the cores this one machine gave, over the churn, to the server, the real pair (A, B,
  Orthanc), storescu and this process (the simulated sites and the thread driving the real studies), ``of`` its CPUs:
  what the busy studies shared the machine with.
  ``study_idle_stages_s`` / ``study_busy_stages_s``: the studies' medians per stage from A's and B's audit (to stable,
  to A's offer, the offer to A's sent and within it the stream's own seconds, B's import, B's receipt back to A).
- ``sim_transfers``: while the region churns, 1 % of the sites (at least one) each offer a small study
  (``--sim-study-kb``, 1 MiB) every 0.5 s to a roster peer they see available, at most 32 at once, as our sender does:
  the offer (the gateway's own stanzas, with the streamhost hint), the XEP-0065 query, the activation at the sender's
  node's proxy65, the bytes. The peer accepts unless it is at its limit or in flow control (refused
  ``resource-constraint``, busy). Counted: sent, received whole (``received``), received short, refused by condition,
  failed by cause and stage (offer, streamhost, activation, stream), with "a party reconnected meanwhile" when the
  sender's or the target's session ended during the attempt (the churn's reconnects); the run stops if none arrived.
The last line: the largest N's figures per server and ``presence_largest_vs_smallest`` (the ratio of
``presence_per_gateway_min`` at the largest N over the smallest; goal <= 1.5: presence grows with a site's peers,
not with the region).

- ``proxy_fanin_mb_s``: 1, 4 and 16 mediated S5B streams at once through one proxy65 (64 MiB in all, activated by a
  simulated site), aggregate MB/s, beside ``raw_tcp_fanin_mb_s``: the same streams over plain loopback TCP.
A study moving while a node dies is in
``tests/integration/test_failover.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback, CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath

from adapters.lab.ejabberd_peer import pid_alive, start_cluster
from adapters.lab.localpeers import Orthanc, Prosody, orthanc_instances
from adapters.lab.synthetic import generate_ct_study
from adapters.xmpp import socks5
from adapters.xmpp.connection import ServerRotation
from adapters.xmpp.presence import FlowControl
from adapters.xmpp.stanzas import (
    NS_S5B,
    Offer,
    build_accept,
    build_offer,
    parse_accept,
    parse_offer,
    q,
)
from bench.e2e import _cpu_s
from bench.transfer import _activate
from gateway.roster import PairGroup, merge, pair_groups, prosody_text

DOMAIN = "helsenett.test"
HUB = f"radiology.hub@{DOMAIN}"
PASSWORD = "pw-region"
NS_SI = "http://jabber.org/protocol/si"
PROXY_JID = f"proxy.{DOMAIN}"  # proxy65 on every node (ejabberd's default host, the lab Prosody's component)
SIM_INBOUND_LIMIT = 2  # a simulated site takes at most this many studies at once; more are refused busy
SIM_MAX_BYTES = 64 * 2**20  # and only small ones
SIM_BLOCK = os.urandom(1 << 16)


def site_jid(i: int) -> str:
    return f"radiology.site-{i:03d}@{DOMAIN}"


def topology(sites: int, per_site: int, seed: int = 18) -> tuple[list[str], list[PairGroup]]:
    """Every site's export (K random peers and the hub, as its admin would list them; a peer lists it back), merged."""
    if not 0 <= per_site < sites:
        raise ValueError(f"{sites} sites cannot each have {per_site} other sites as peers (--peers-per-site below --sites)")
    rng = random.Random(seed)
    jids = [site_jid(i) for i in range(1, sites + 1)]
    peers: dict[str, set[str]] = {jid: {HUB} for jid in jids}
    peers[HUB] = set(jids)
    for jid in jids:
        while len(peers[jid]) < per_site + 1:
            other = rng.choice(jids)
            if other != jid:
                peers[jid].add(other)
                peers[other].add(jid)
    exports = [(jid, pair_groups("DICOM gateways", jid, {p: p.split("@")[0] for p in sorted(mine)}))
               for jid, mine in peers.items()]
    merged = merge(exports)
    assert not merged.one_sided, merged.one_sided[:3]
    return [HUB, *jids], merged.groups


class SimSite(slixmpp.ClientXMPP):
    """A simulated gateway: presence as ours (FlowControl), roster; offers answered as ours answer them (busy at
    its limit or in flow control, else a small study accepted and read over S5B through the proxy65 its offer
    names), and small studies offered to roster peers it sees available (``send_small``); counts presence received
    and, in ``tally``, the simulated transfers."""

    by_bare: dict[str, SimSite] = {}  # the simulated sites of this process, by bare JID

    def __init__(self, jid: str, servers: list[tuple[str, int]], ca_file: Path,
                 proxies: dict[tuple[str, int], int] | None = None, tally: collections.Counter[str] | None = None) -> None:
        super().__init__(f"{jid}/gw1", PASSWORD)
        self.enable_direct_tls, self.enable_starttls, self.enable_plaintext = False, True, False  # as the agent
        self.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        self.servers = ServerRotation(tuple(servers), reconnect_s=5.0)  # as the gateway's agent (connection.py)
        self.presence_in = 0
        self.up = asyncio.Event()
        self.up_at = 0.0
        self.stopping = False
        self.flow = FlowControl(lambda show, status: self.send_presence(pshow=show, pstatus=status), 2.0,
                                lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn))
        self.busy = False
        self.proxies = proxies or {}  # its node (host, c2s port) -> that node's proxy65 port
        self.tally = tally if tally is not None else collections.Counter()  # simulated transfers, shared by the region
        self.peers_seen: dict[str, tuple[str, str]] = {}  # a roster peer online: bare -> (full JID, show)
        self.inbound: dict[str, tuple[str, int]] = {}  # sid -> (sender's full JID, size): accepted, stream to come
        self.sessions_lost = 0  # its sessions that ended (the churn's reconnects): a transfer cut by one says so
        SimSite.by_bare[jid] = self
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("presence", self._presence)
        self.add_event_handler("disconnected", self._lost)
        self.add_event_handler("connection_failed", lambda _e: self._lost(None))
        self.register_handler(Callback("si offer", MatchXPath(f"{{jabber:client}}iq/{{{NS_SI}}}si"), self._offer))
        self.register_handler(CoroutineCallback("s5b query", MatchXPath(f"{{jabber:client}}iq/{q(NS_S5B, 'query')}"),
                                                self._streamhost))

    def start(self) -> None:
        self.connect(*self.servers.current)

    async def _started(self, _event: object) -> None:
        await self.get_roster()
        self.flow.session_started()
        self.up_at = time.monotonic()
        self.servers.connected()
        self.up.set()

    def _presence(self, presence: slixmpp.Presence) -> None:
        sender = presence["from"]
        if sender.bare == self.boundjid.bare:
            return
        self.presence_in += 1
        kind = presence["type"]
        if kind in ("unavailable", "error"):
            self.peers_seen.pop(sender.bare, None)
        elif kind not in ("subscribe", "subscribed", "unsubscribe", "unsubscribed", "probe"):
            self.peers_seen[sender.bare] = (sender.full, presence["show"])

    def _refuse(self, iq: slixmpp.Iq, condition: str, text: str, etype: str = "cancel") -> None:
        error = iq.reply(clear=True)
        error["type"] = "error"
        error["error"]["type"] = etype
        error["error"]["condition"] = condition
        error["error"]["text"] = text
        error.send()

    def _offer(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        try:
            offer = parse_offer(iq.xml.find(q(NS_SI, "si")))
        except ValueError as exc:
            self._refuse(iq, "bad-request", str(exc))
            return
        if self.busy or len(self.inbound) >= SIM_INBOUND_LIMIT:
            self._refuse(iq, "resource-constraint", "busy: at the inbound transfer limit", "wait")
        elif offer.size > SIM_MAX_BYTES or NS_S5B not in offer.methods:
            self._refuse(iq, "not-acceptable", "simulated gateway: small studies over S5B only")
        else:
            self.inbound[offer.sid] = (iq["from"].full, offer.size)
            asyncio.get_running_loop().call_later(60, self.inbound.pop, offer.sid, None)  # no stream came: forgotten
            reply = iq.reply(clear=True)
            reply.xml.append(build_accept(NS_S5B, 0))
            reply.send()

    async def _streamhost(self, iq: slixmpp.Iq) -> None:
        """The sender's XEP-0065 query: our leg to its proxy, then ``streamhost-used``, then the study read to its end."""
        if iq["type"] != "set":
            return
        query = iq.xml.find(q(NS_S5B, "query"))
        sid = query.get("sid", "") if query is not None else ""
        host = query.find(q(NS_S5B, "streamhost")) if query is not None else None
        entry = self.inbound.pop(sid, None)
        if entry is None or host is None or entry[0] != iq["from"].full:
            self._refuse(iq, "item-not-found", "no accepted offer with this stream id")
            return
        try:
            reader, writer = await socks5.connect(host.get("host", ""), int(host.get("port", "0")),
                                                  socks5.dst_addr(sid, entry[0], self.boundjid.full))
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            self.tally[f"failed: target's proxy leg ({type(exc).__name__})"] += 1
            self._refuse(iq, "remote-server-not-found", "the streamhost could not be reached")
            return
        reply = iq.reply(clear=True)
        used = ET.SubElement(reply.xml, q(NS_S5B, "query"), {"sid": sid})
        ET.SubElement(used, q(NS_S5B, "streamhost-used"), {"jid": host.get("jid", "")})
        reply.send()
        got = 0
        try:
            async with asyncio.timeout(120):
                while data := await reader.read(1 << 16):
                    got += len(data)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
        self.tally["received" if got == entry[1] else "received short"] += 1
        self.tally["received_bytes"] += got

    async def send_small(self, size: int, rng: random.Random) -> None:
        """Offer a small study (``size`` bytes) to a roster peer it sees available, as our sender does (not to one
        in flow control), and stream it through its node's proxy65: the offer, the XEP-0065 query, the proxy's
        activation, the bytes. What happened goes to ``tally``."""
        ready = sorted(full for full, show in self.peers_seen.values() if show in ("", "chat"))
        proxy_port = self.proxies.get(self.servers.current)
        if not ready or proxy_port is None or not self.up.is_set():
            return
        target, sid = rng.choice(ready), uuid.uuid4().hex
        peer = SimSite.by_bare.get(target.split("/")[0])
        lost = (self.sessions_lost, peer.sessions_lost if peer is not None else 0)
        stage = "offer"
        offer = Offer(sid, "simulated.bundle", size, os.urandom(32).hex(), (NS_S5B,),
                      streamhost=(PROXY_JID, "127.0.0.1", proxy_port))
        try:
            ask = self.make_iq_set(ito=target)
            ask.xml.append(build_offer(offer))
            try:
                answer = await ask.send(timeout=30)
            except IqError as exc:
                self.tally[f"refused {exc.iq['error']['condition']}"] += 1
                return
            parse_accept(answer.xml.find(q(NS_SI, "si")))
            stage = "streamhost"
            query = self.make_iq_set(ito=target)
            el = ET.SubElement(query.xml, q(NS_S5B, "query"), {"sid": sid, "mode": "tcp"})
            ET.SubElement(el, q(NS_S5B, "streamhost"), {"jid": PROXY_JID, "host": "127.0.0.1", "port": str(proxy_port)})
            await query.send(timeout=30)
            reader, writer = await socks5.connect("127.0.0.1", proxy_port, socks5.dst_addr(sid, self.boundjid.full, target))
            try:
                stage = "activation"
                activate = self.make_iq_set(ito=PROXY_JID)
                activate.xml.append(_activate(sid, target))
                await activate.send(timeout=30)
                stage, left = "stream", size
                while left > 0:
                    writer.write(SIM_BLOCK[: min(len(SIM_BLOCK), left)])
                    left -= min(len(SIM_BLOCK), left)
                    await writer.drain()
                writer.write_eof()
                await asyncio.wait_for(reader.read(1), 120)  # the proxy closes our leg once the target closed its
            finally:
                writer.close()
            self.tally["sent"] += 1
            self.tally["sent_bytes"] += size
        except (IqError, IqTimeout, OSError, ValueError, asyncio.TimeoutError) as exc:
            # A party whose session ended meanwhile (the churn reconnects 1 % of the sites every 5 s) cannot answer.
            churned = (self.sessions_lost, peer.sessions_lost if peer is not None else 0) != lost
            self.tally[f"failed: {type(exc).__name__} at the {stage}" + (", a party reconnected meanwhile" if churned else "")] += 1

    def _lost(self, _event: object) -> None:
        self.sessions_lost += 1
        self.up.clear()
        self.flow.session_ended()
        if not self.stopping:
            self.cancel_connection_attempt()
            asyncio.get_running_loop().call_later(self.servers.after_failure(), self.start)

    def toggle(self) -> None:
        self.busy = not self.busy
        self.flow.set(self.busy, "busy: at the inbound transfer limit" if self.busy else "ready", self.up.is_set())


class RealPair:
    """Two real ``dicomgw run`` gateways (A -> B, end-to-end encrypted, S5B through the node's proxy65) with Orthanc
    behind B, on the region's server: ``study(n)`` sends a fresh ~60 MB CT study to A with dcmtk's storescu and
    returns the seconds from its last C-STORE response to A's units ``delivered`` (B's receipt: Orthanc holds every
    instance), checked against Orthanc's SOP Instance UIDs."""

    def __init__(self, work: Path, server: Any, slices: int) -> None:
        from bench.transfer import GatewayProcess, identity

        self.work, self.slices, self.sent = work, slices, 0
        self.orthanc = Orthanc(work / "orthanc", ae_title="PACS_B").start()
        pacs = f'[pacs]\nae_title = "PACS_B"\nhost = "127.0.0.1"\nport = {self.orthanc.dicom_port}\ncalling_ae_title = "GWB"\n'
        a_fp, b_fp = identity(work / "a"), identity(work / "b")
        self.b = GatewayProcess(work / "b", "radiology.hospital-b", server, "radiology.hospital-a", peer_fingerprint=a_fp)
        self.b.text += pacs
        self.b.start()
        self.a = GatewayProcess(work / "a", "radiology.hospital-a", server, "radiology.hospital-b", "radiology.hospital-b",
                                peer_fingerprint=b_fp).start()
        self.uids: set[str] = set()
        self.stages: list[dict[str, float]] = []  # per study, in order: see _stages

    def delivered(self) -> int:
        """Instances of A's delivered units: a study that A took in as more than one unit (the modality paused
        past the stable age between two instances, as a busy machine's storescu can) counts once all are."""
        with _queue_db(self.a) as conn:
            return int(conn.execute("SELECT COALESCE(SUM(instance_count), 0) FROM study_units WHERE state = 'delivered'")
                       .fetchone()[0])

    def study(self) -> float:
        import subprocess

        self.sent += 1
        study = generate_ct_study(self.work / f"study-{self.sent}", series=1, slices_per_series=self.slices)
        self.uids |= set(study.sop_instance_uids)
        subprocess.run(["/usr/bin/storescu", "-aec", "DICOMGW", "127.0.0.1", str(self.a.port), *map(str, study.files)],
                       check=True, capture_output=True, timeout=600)
        stored, stored_at = time.monotonic(), datetime.now(UTC).replace(tzinfo=None)
        deadline = stored + 900
        while self.delivered() < len(self.uids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"study {self.sent} not delivered after 900 s")
            time.sleep(0.05)
        took = time.monotonic() - stored
        held = set(orthanc_instances(self.orthanc))
        if held != self.uids:
            raise RuntimeError(f"Orthanc holds {len(held)} of {len(self.uids)} instances")
        self.stages.append(self._stages(study.study_instance_uid, stored_at))
        return took

    def _stages(self, study_uid: str, stored_at: datetime) -> dict[str, float]:
        """Where the study's seconds went, from A's and B's audit (UTC): the last C-STORE response to stable, the
        dispatch to A's first offer, the offer to A's sent (B verified), B's import, B's receipt back to A."""
        def moves(conn: sqlite3.Connection) -> dict[str, datetime]:
            first: dict[str, datetime] = {}
            for at, state in conn.execute("SELECT at, to_state FROM audit_log WHERE study_instance_uid = ? AND to_state "
                                          "IS NOT NULL ORDER BY id", (study_uid,)):
                first.setdefault(state, datetime.fromisoformat(at))
            return first

        with _queue_db(self.a) as conn_a, _queue_db(self.b) as conn_b:
            a, b = moves(conn_a), moves(conn_b)
            stream = conn_a.execute("SELECT t.stream_s FROM transfers t JOIN study_units u ON t.unit_id = u.id WHERE "
                                    "u.study_instance_uid = ? AND t.direction = 'out' AND t.stream_s IS NOT NULL "
                                    "ORDER BY t.id DESC", (study_uid,)).fetchone()
        try:
            marks = [stored_at, a["stable"], a["offering"], a["sent"], b["delivered"], a["delivered"]]
        except KeyError:  # a state the audit does not hold (a study split in units): no breakdown
            return {}
        names = ("stable_wait", "to_offer", "offer_to_sent", "import", "receipt")
        stages = {name: round((end - start).total_seconds(), 3) for name, start, end in zip(names, marks, marks[1:])}
        if stream is not None:  # of the offer to sent: the bytes' own time (A's first to last byte on the stream)
            stages["stream"] = round(float(stream[0]), 3)
        return stages

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()
        self.orthanc.stop()


async def _pump(writers: list[asyncio.StreamWriter], readers: list[asyncio.StreamReader], per: int) -> float:
    """``per`` bytes into every writer and out of its reader, all at once; aggregate MB/s (each stream complete)."""
    block = os.urandom(1 << 20)

    async def out(writer: asyncio.StreamWriter) -> None:
        left = per
        while left > 0:
            writer.write(block[: min(len(block), left)])
            await writer.drain()
            left -= min(len(block), left)
        writer.write_eof()

    async def into(reader: asyncio.StreamReader) -> int:
        got = 0
        while got < per:
            data = await reader.read(1 << 20)
            if not data:
                break
            got += len(data)
        return got

    started = time.perf_counter()
    *_sent, got = await asyncio.wait_for(asyncio.gather(*map(out, writers), asyncio.gather(*map(into, readers))), 600)
    seconds = time.perf_counter() - started
    if got != [per] * len(readers):
        raise RuntimeError(f"a stream lost bytes: {got}")
    for writer in writers:
        writer.close()
    return per * len(readers) / seconds / 1e6


async def proxy_fanin(initiator: SimSite, proxy_port: int, streams: int, total: int) -> float:
    """``streams`` mediated S5B streams at once through one proxy65 (XEP-0065: both ends connect, the initiator
    activates each through the server), ``total`` bytes in all: aggregate MB/s."""
    targets, initiators = [], []
    for k in range(streams):
        sid, target = f"fanin{streams}x{k}", f"sink{k}@{DOMAIN}/t"
        digest = socks5.dst_addr(sid, initiator.boundjid.full, target)
        targets.append(await socks5.connect("127.0.0.1", proxy_port, digest))
        initiators.append(await socks5.connect("127.0.0.1", proxy_port, digest))
        activate = initiator.make_iq_set(ito=f"proxy.{DOMAIN}")
        activate.xml.append(_activate(sid, target))
        await activate.send(timeout=30)
    return await _pump([w for _r, w in initiators], [r for r, _w in targets], total // streams)


async def raw_fanin(streams: int, total: int) -> float:
    """The reference: the same streams over plain loopback TCP, no relay."""
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, _w: accepted.put_nowait(r), "127.0.0.1", 0, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    writers = [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in range(streams)]
    readers = [await accepted.get() for _ in range(streams)]
    try:
        return await _pump(writers, readers, total // streams)
    finally:
        server.close()


def prosody_accounts(server: Prosody, jids: list[str]) -> None:
    """Accounts written as Prosody's internal_hashed store keeps them (SCRAM-SHA-1, 10000 iterations), before start."""
    directory = server.workdir / "data" / DOMAIN.replace(".", "%2e") / "accounts"
    directory.mkdir(parents=True, exist_ok=True)
    for jid in jids:
        salt = str(uuid.uuid4())
        salted = hashlib.pbkdf2_hmac("sha1", PASSWORD.encode(), salt.encode(), 10000)
        stored = hashlib.sha1(hmac.new(salted, b"Client Key", "sha1").digest()).hexdigest()
        server_key = hmac.new(salted, b"Server Key", "sha1").hexdigest()
        name = jid.split("@")[0].replace("%", "%25").replace(".", "%2e").replace("-", "%2d")
        (directory / f"{name}.dat").write_text(
            f'return {{\n\t["stored_key"] = "{stored}";\n\t["iteration_count"] = 10000;\n\t["salt"] = "{salt}";\n'
            f'\t["server_key"] = "{server_key}";\n}};\n')


@contextlib.contextmanager
def _queue_db(site: Any) -> Iterator[sqlite3.Connection]:
    """A real gateway's queue database, read-only, beside the running gateway."""
    with contextlib.closing(sqlite3.connect(f"file:{site.workdir / 'queue.db'}?mode=ro", uri=True, timeout=5)) as conn:
        yield conn


def _median_stages(stages: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the studies that have a breakdown."""
    whole = [s for s in stages if s]
    return {name: round(statistics.median(s[name] for s in whole), 3) for name in whole[0]} if whole else {}


def _cores_used(server: list[int], pair: list[int]) -> dict[str, float]:
    """CPU seconds so far: the XMPP server's processes, the real pair (A, B, Orthanc), storescu (this process's
    reaped children) and this process (the simulated sites and the thread that drives the real studies)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"server": sum(_cpu_s(p) for p in server if pid_alive(p)), "real_pair": sum(_cpu_s(p) for p in pair if pid_alive(p)),
            "storescu": children.ru_utime + children.ru_stime, "emulator": own.ru_utime + own.ru_stime}


def server_pids(kind: str, servers: list[Any]) -> list[int]:
    pids = []
    for server in servers:
        pid_file = server.workdir / ("ejabberd.pid" if kind == "ejabberd" else "prosody.pid")
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pid_file.read_text().strip()))
    return [p for p in pids if pid_alive(p)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_all(sites: list[SimSite], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    deadline = started + timeout_s
    while not all(s.up.is_set() for s in sites):
        if time.monotonic() > deadline:
            down = [s.boundjid.bare for s in sites if not s.up.is_set()]
            raise TimeoutError(f"{what}: {len(down)} site(s) not online after {timeout_s:.0f} s, e.g. {down[:3]}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def measure(kind: str, servers: list[Any], jids: list[str], churn_s: float, pair: RealPair | None = None,
                  study_runs: int = 3, seed: int = 7, sim_study_kb: int = 1024) -> dict[str, Any]:
    nodes = [("127.0.0.1", s.c2s_port) for s in servers]
    proxies = {node: server.proxy_port for node, server in zip(nodes, servers, strict=True)}
    tally: collections.Counter[str] = collections.Counter()
    sims = [SimSite(jid, [nodes[i % len(nodes)], *[n for n in nodes if n != nodes[i % len(nodes)]]], servers[0].ca_file,
                    proxies, tally)
            for i, jid in enumerate(jids)]
    rng = random.Random(seed)
    ordinary = sims[1:]
    result: dict[str, Any] = {"sites": len(jids)}
    try:
        if pair is not None:  # the real studies on an idle server first (the median of study_runs)
            result["study_idle_s"] = round(statistics.median([await asyncio.to_thread(pair.study) for _ in range(study_runs)]), 2)
            result["study_idle_stages_s"] = _median_stages(pair.stages[-study_runs:])
        started = time.monotonic()
        for sim in sims:
            sim.start()
        await wait_all(sims, 600, "login storm")
        result["login_storm_s"] = round(max(s.up_at for s in sims) - started, 2)
        await asyncio.sleep(3)  # the initial presence exchange settles
        pids = server_pids(kind, servers)
        result["server_rss_mb"] = round(sum(rss_mb(p) for p in pids), 1)

        # one change of one ordinary site in a quiet region: how many stanzas it costs the region
        for sim in sims:
            sim.presence_in = 0
        ordinary[0].toggle()
        await asyncio.sleep(2.5)
        result["presence_per_change"] = sum(s.presence_in for s in sims)
        ordinary[0].toggle()
        await asyncio.sleep(2.5)

        # churn: flow control flipping on 5 % of the sites every 0.5 s, 1 % reconnecting every 5 s
        for sim in sims:
            sim.presence_in = 0
        cpu_before = {p: _cpu_s(p) for p in pids}
        pair_pids = [pair.a.pid, pair.b.pid, pair.orthanc.pid] if pair is not None else []
        cores_before = _cores_used(pids, pair_pids)
        churn_started = time.monotonic()
        tick = 0
        moving = asyncio.ensure_future(asyncio.to_thread(lambda: [pair.study() for _ in range(study_runs)])) \
            if pair is not None else None
        sending: set[asyncio.Task[None]] = set()
        while time.monotonic() - churn_started < churn_s or (moving is not None and not moving.done()):
            for sim in rng.sample(ordinary, max(1, len(ordinary) // 20)):
                sim.toggle()
            if tick % 10 == 0:
                for sim in rng.sample(ordinary, max(1, len(ordinary) // 100)):
                    sim.disconnect()  # comes back by itself (SimSite._lost)
            if sim_study_kb > 0:  # 1 % of the sites offer a small study to a peer each tick, at most 32 at once
                for sim in rng.sample(ordinary, max(1, len(ordinary) // 100)):
                    if len(sending) < 32:
                        task = asyncio.ensure_future(sim.send_small(sim_study_kb * 1024, rng))
                        sending.add(task)
                        task.add_done_callback(sending.discard)
            tick += 1
            await asyncio.sleep(0.5)
        elapsed_min = (time.monotonic() - churn_started) / 60
        # where this machine's CPUs went while the region churned and the busy studies ran (all on one machine)
        result["cpu_cores_during_churn"] = {
            name: round((after - cores_before[name]) / (elapsed_min * 60), 2)
            for name, after in _cores_used(pids, pair_pids).items()} | {"of": os.cpu_count()}
        if sending:
            await asyncio.wait(sending, timeout=180)
        if sim_study_kb > 0:  # the receivers' counts follow the senders' by the proxy's last bytes
            deadline = time.monotonic() + 30
            while tally["received"] + tally["received short"] < tally["sent"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            result["sim_transfers"] = dict(sorted(tally.items()))
            if not tally["received"]:
                raise RuntimeError(f"no simulated transfer arrived: {dict(tally)}")
        if moving is not None:
            result["study_busy_s"] = round(statistics.median(await moving), 2)
            result["study_busy_vs_idle"] = round(result["study_busy_s"] / result["study_idle_s"], 2)
            result["study_busy_stages_s"] = _median_stages(pair.stages[-study_runs:])
        cpu = sum(_cpu_s(p) - cpu_before[p] for p in pids if pid_alive(p))
        result["presence_per_gateway_min"] = round(statistics.median(s.presence_in for s in ordinary) / elapsed_min, 1)
        result["hub_presence_min"] = round(sims[0].presence_in / elapsed_min, 1)
        result["server_cpu_s_per_min_per_100"] = round(cpu / elapsed_min / len(jids) * 100, 2)
        await wait_all(sims, 120, "the churn to settle")

        # concurrent studies' streams through one proxy65 (node 1's for ejabberd) vs plain loopback TCP
        total = 64 * 2**20
        result["proxy_fanin_mb_s"] = {str(n): round(await proxy_fanin(ordinary[0], servers[0].proxy_port, n, total), 1)
                                      for n in (1, 4, 16)}
        result["raw_tcp_fanin_mb_s"] = {str(n): round(await raw_fanin(n, total), 1) for n in (1, 4, 16)}

        if kind == "ejabberd" and len(servers) > 1:  # a node dies: its sites move to the other
            on_first = [s for s in sims if s.servers.current == nodes[0]]
            killed = time.monotonic()
            servers[0].kill()
            await asyncio.sleep(0.5)
            await wait_all(on_first, 120, "failover")
            result["failover_s"] = round(max(s.up_at for s in on_first) - killed, 2)
            result["failover_sites"] = len(on_first)
    finally:
        for sim in sims:
            sim.stopping = True
            with contextlib.suppress(Exception):
                sim.disconnect()
        await asyncio.sleep(1)
    return result


def real_pair_groups() -> list[PairGroup]:
    a, b = f"radiology.hospital-a@{DOMAIN}", f"radiology.hospital-b@{DOMAIN}"
    return pair_groups("DICOM gateways", a, {b: "Radiology B"})


def run_ejabberd(work: Path, jids: list[str], groups: list[PairGroup], churn_s: float, slices: int,
                 roster: str = "items", study_runs: int = 3, sim_study_kb: int = 1024) -> dict[str, Any]:
    nodes = start_cluster(work / "ejabberd", nodes=2, domain=DOMAIN, http_api=True)
    pair = None
    try:
        api = nodes[0].api
        if slices:
            for user in ("radiology.hospital-a", "radiology.hospital-b"):
                api("register", user=user, host=DOMAIN, password=f"pw-{user}")
            groups = [*groups, *real_pair_groups()]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda jid: api("register", user=jid.split("@")[0], host=DOMAIN, password=PASSWORD), jids))
            if roster == "srg":  # the export as written: shared roster groups, one per pair
                list(pool.map(lambda g: api("srg_create", group=g.group_id, host=DOMAIN, label=g.label,
                                            description="dicomgw peers export", display=g.group_id), groups))
                list(pool.map(lambda m: api("srg_user_add", user=m[0].split("@")[0], host=DOMAIN, group=m[1],
                                            grouphost=DOMAIN), [(jid, g.group_id) for g in groups for jid in g.members]))
            else:  # the same pairs as roster items of each user (mod_admin_extra add_rosteritem), both ways
                items = [(own, other, g.members[other]) for g in groups for own in g.members for other in g.members
                         if other != own]
                list(pool.map(lambda i: api("add_rosteritem", localuser=i[0].split("@")[0], localhost=DOMAIN,
                                            user=i[1].split("@")[0], host=DOMAIN, nick=i[2], group="DICOM gateways",
                                            subs="both"), items))
        pair = RealPair(work / "real", nodes[1], slices) if slices else None  # on node 2: node 1 dies at the end
        return asyncio.run(measure("ejabberd", nodes, jids, churn_s, pair, study_runs, sim_study_kb=sim_study_kb))
    finally:
        if pair is not None:
            pair.stop()
        for node in reversed(nodes):
            node.stop()


def run_prosody(work: Path, jids: list[str], groups: list[PairGroup], churn_s: float, slices: int,
                study_runs: int = 3, sim_study_kb: int = 1024) -> dict[str, Any]:
    variant = Path(__file__).resolve().parents[1] / "conf" / "prosody" / "plugins"  # the proxy65 a site deploys
    server = Prosody(work / "prosody", DOMAIN, plugin_paths=[variant],
                     groups_text=prosody_text([*groups, *(real_pair_groups() if slices else [])]))
    prosody_accounts(server, jids)
    pair = None
    try:
        if slices:
            for user in ("radiology.hospital-a", "radiology.hospital-b"):
                server.add_account(user, f"pw-{user}")
        server.start()
        pair = RealPair(work / "real", server, slices) if slices else None
        return asyncio.run(measure("prosody", [server], jids, churn_s, pair, study_runs, sim_study_kb=sim_study_kb))
    finally:
        if pair is not None:
            pair.stop()
        server.stop()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its servers (finally)
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", default="50,200,500")
    parser.add_argument("--peers-per-site", type=int, default=4)
    parser.add_argument("--server", choices=["ejabberd", "prosody", "both"], default="both")
    parser.add_argument("--churn-s", type=float, default=30.0)
    parser.add_argument("--study-slices", type=int, default=115, help="the real study: 512x512 CT slices (115: ~60 MB); "
                        "0: no real gateways")
    parser.add_argument("--study-runs", type=int, default=3, help="studies per case (idle, busy): their median")
    parser.add_argument("--ejabberd-roster", choices=["srg", "items"], default="items",
                        help="items (default): `peers export ejabberd-roster`, the pairs as each user's roster items; "
                             "srg: `peers export ejabberd`, one shared roster group per pair")
    parser.add_argument("--sim-study-kb", type=int, default=1024, help="the small studies the simulated sites send "
                        "each other while the region churns (1 %% of the sites offer one every 0.5 s); 0: none")
    parser.add_argument("--quick", action="store_true", help="50 and 200 sites, 15 s of churn, a 40-slice study")
    args = parser.parse_args()
    counts = [50, 200] if args.quick else [int(n) for n in args.sites.split(",")]
    if any(not 0 <= args.peers_per_site < n for n in counts):
        parser.error(f"--peers-per-site {args.peers_per_site} needs more sites than that in every --sites count")
    churn_s = 15.0 if args.quick else args.churn_s
    slices = min(args.study_slices, 40) if args.quick else args.study_slices
    kinds = ["ejabberd", "prosody"] if args.server == "both" else [args.server]
    work = Path(tempfile.mkdtemp(prefix="dicomgw-region-"))
    results: dict[str, dict[int, dict[str, Any]]] = {}
    ended = False
    try:  # the servers, the real pair and Orthanc are stopped by then (run_*); their files (~2 GB) go with it
        for kind in kinds:
            for n in counts:
                jids, groups = topology(n, args.peers_per_site)
                figures = (run_ejabberd(work / f"{kind}-{n}", jids, groups, churn_s, slices, args.ejabberd_roster, args.study_runs,
                                        args.sim_study_kb)
                           if kind == "ejabberd" else run_prosody(work / f"{kind}-{n}", jids, groups, churn_s, slices, args.study_runs,
                                                                  args.sim_study_kb))
                figures["groups"] = len(groups)
                results.setdefault(kind, {})[n] = figures
                print(f"{kind:8} {n:>4} sites: " + "  ".join(f"{k} {v}" for k, v in figures.items() if k != "sites"), flush=True)
        ended = True
    finally:
        if ended:
            shutil.rmtree(work, ignore_errors=True)
        else:  # a failed run keeps its gateways' logs and queues, Orthanc's and the servers' for the reader
            print(f"the run failed; its files are kept at {work}", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"sites": counts, "peers_per_site": args.peers_per_site, "churn_s": churn_s}
    for kind, by_n in results.items():
        small, large = by_n[counts[0]], by_n[counts[-1]]
        grown = large["sites"] - small["sites"]  # RSS per 100 sites: what the sites add (the idle VMs' share apart)
        large["server_rss_mb_per_100"] = round((large["server_rss_mb"] - small["server_rss_mb"]) / grown * 100, 1) \
            if grown else round(large["server_rss_mb"] / large["sites"] * 100, 1)
        summary[kind] = {**large, "presence_largest_vs_smallest": round(
            large["presence_per_gateway_min"] / small["presence_per_gateway_min"], 2) if small["presence_per_gateway_min"] else None,
            "presence_per_change_largest_vs_smallest": round(large["presence_per_change"] / small["presence_per_change"], 2)
            if small["presence_per_change"] else None, "by_sites": by_n}
    first = summary[kinds[0]]
    summary.update({k: first.get(k) for k in ("login_storm_s", "presence_per_gateway_min", "presence_largest_vs_smallest",
                                              "server_rss_mb_per_100", "failover_s", "study_busy_vs_idle")})
    summary.update({"study_mb": round(slices * 0.525, 1), "proxy_fanin_mb_s": first.get("proxy_fanin_mb_s"),
                    "raw_tcp_fanin_mb_s": first.get("raw_tcp_fanin_mb_s")})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
