"""A flood of refused offers at the XMPP edge (issue 15 §2): ``bash bench/flood [--offers 2000] [--mb 300] [--no-hog]``.

Gateway B (a ``dicomgw run`` process) exchanges studies with A (another); a stranger's client (an account
B does not know, in a process of its own) sends ``--offers`` study offers to B at once, while one CPU-bound
process (``python3 -c 'while True: pass'``) runs beside them on this machine throughout, as on a busy 2-CPU
CI box (``--no-hog``: without it).

1. idle: a study of ``--mb`` (300 MB by default, as the issue's 315 MB one) pushed into A with dcmtk's
   storescu; seconds from the push to A's unit ``sent`` (B verified every byte);
2. flood: the stranger's offers go out and, at once, a second study of the same size is pushed into A;
   each offer's seconds to B's answer (``forbidden``) and the study's seconds as in 1.

The last line is one JSON object: ``answered`` (of ``offers``), ``answer_p50_s``, ``answer_p95_s`` (goal < 2),
``answer_max_s``, ``study_idle_s``, ``study_flood_s``, ``flood_vs_idle`` (goal <= 1.5), ``audited`` (the
refusals B's audit log counts: every one, in one row per minute).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.lab.localpeers import Prosody
from adapters.lab.synthetic import generate_ct_study
from bench.priority import push, unit_row, wait
from bench.transfer import DOMAIN, GatewayProcess, identity

A_USER, B_USER, X_USER = "radiology.hospital-a", "radiology.hospital-b", "radiology.hospital-x"
SLICE_BYTES = 512 * 512 * 2 + 1400


def flood(port: int, ca_file: str, offers: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """In a process of its own: log in as the stranger, write every offer at once (stanzas serialised before
    the clock starts, so that the client's own XML cost is not counted as B's), put each answer's seconds."""
    import asyncio
    import xml.etree.ElementTree as ET

    import slixmpp
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath

    from adapters.xmpp.stanzas import NS_IBB, Offer, build_offer

    async def run() -> list[tuple[float, str]]:
        client = slixmpp.ClientXMPP(f"{X_USER}@{DOMAIN}/flood", f"pw-{X_USER}")
        client.enable_direct_tls = False
        client.ssl_context = ssl.create_default_context(cafile=ca_file)
        online = asyncio.Event()
        client.add_event_handler("session_start", lambda _e: online.set())
        client.connect("127.0.0.1", port)
        await asyncio.wait_for(online.wait(), 30)
        sent: dict[str, float] = {}
        results: list[tuple[float, str]] = []
        done = asyncio.Event()

        def answered(iq: Any) -> None:
            started = sent.pop(iq["id"], None)
            if started is not None:
                results.append((time.monotonic() - started, iq["error"]["condition"] if iq["type"] == "error" else "result"))
                if len(results) == offers:
                    done.set()

        client.register_handler(Callback("answers", MatchXPath("{jabber:client}iq"), answered))
        to = f"{B_USER}@{DOMAIN}/gw1"
        stanzas = [(f"f{n}", f"<iq type='set' to='{to}' id='f{n}'>"
                    + ET.tostring(build_offer(Offer(f"flood{n}", f"flood{n}.dgwb", 1000, "ab" * 32, (NS_IBB,))), encoding="unicode")
                    + "</iq>") for n in range(offers)]
        for iq_id, raw in stanzas:
            sent[iq_id] = time.monotonic()
            client.send_raw(raw)
        try:
            await asyncio.wait_for(done.wait(), 120)
        except TimeoutError:
            results.extend((120.0, "timeout") for _ in sent)
        client.disconnect()
        return results

    out.put(asyncio.run(run()))


def audited(b: GatewayProcess) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{b.workdir / 'queue.db'}?mode=ro", uri=True, timeout=5)) as conn:
        return int(conn.execute("SELECT coalesce(sum(repeat_count), 0) FROM audit_log WHERE event = 'offer_refused'").fetchone()[0])


def timed_study(a: GatewayProcess, study: object) -> float:
    started = time.monotonic()
    push(a, study.files)  # type: ignore[attr-defined]
    ended = wait("the study sent", lambda: (u := unit_row(a, study.study_instance_uid)) is not None and u[0] in ("sent", "delivered"),  # type: ignore[attr-defined]
                 1800, 0.05)
    return ended - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offers", type=int, default=2000)
    parser.add_argument("--mb", type=float, default=300.0)
    parser.add_argument("--no-hog", action="store_true", help="no CPU-bound process beside the flood")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomgw-flood-"))
    server = Prosody(work / "prosody", domain=DOMAIN)
    for user in (A_USER, B_USER, X_USER):
        server.add_account(user, f"pw-{user}")
    a = b = hog = None
    try:
        slices = max(1, round(args.mb * 1e6 / SLICE_BYTES))
        idle_study = generate_ct_study(work / "idle", 1, slices, seed=21)
        flood_study = generate_ct_study(work / "flood", 1, slices, seed=22)
        server.start()
        a_fp, b_fp = identity(work / "a"), identity(work / "b")
        b = GatewayProcess(work / "b", B_USER, server, A_USER, peer_fingerprint=a_fp).start()
        a = GatewayProcess(work / "a", A_USER, server, B_USER, B_USER, peer_fingerprint=b_fp).start()
        if not args.no_hog:  # the machine's condition in both phases: the flood is what differs
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # both online and subscribed (presence)
        study_idle_s = timed_study(a, idle_study)
        print(f"study of {idle_study.size_bytes / 1e6:.1f} MB, no flood: {study_idle_s:.2f} s to sent", flush=True)
        out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
        flooder = multiprocessing.get_context("spawn").Process(target=flood, args=(server.c2s_port, str(server.ca_file), args.offers, out))
        flooder.start()
        study_flood_s = timed_study(a, flood_study)
        results = out.get(timeout=600)
        flooder.join(30)
        seconds = sorted(s for s, _answer in results)
        answers = {answer: sum(1 for _s, x in results if x == answer) for answer in {x for _s, x in results}}
        wait("every refusal in B's audit log", lambda: audited(b) >= args.offers, 60, 0.2)
        summary = {
            "offers": args.offers, "answered": sum(v for k, v in answers.items() if k != "timeout"), "answers": answers,
            "cpu_hog": not args.no_hog,
            "answer_p50_s": round(statistics.median(seconds), 3), "answer_p95_s": round(seconds[int(len(seconds) * 0.95) - 1], 3),
            "answer_max_s": round(seconds[-1], 3), "study_mb": round(idle_study.size_bytes / 1e6, 1),
            "study_idle_s": round(study_idle_s, 2), "study_flood_s": round(study_flood_s, 2),
            "flood_vs_idle": round(study_flood_s / study_idle_s, 2), "audited": audited(b),
            "goals": {"answer_p95_s": 2.0, "flood_vs_idle": 1.5},
        }
        print(f"{summary['answered']} of {args.offers} offers answered {answers}: p50 {summary['answer_p50_s']} s, p95 "
              f"{summary['answer_p95_s']} s, max {summary['answer_max_s']} s; study during the flood {study_flood_s:.2f} s "
              f"({summary['flood_vs_idle']}x idle)", flush=True)
        print(json.dumps(summary))
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        for gateway in (a, b):
            if gateway is not None:
                gateway.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
