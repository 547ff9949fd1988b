"""Mutation fuzzer against the running SCP (issue 8, section 4): ``bash bench/fuzz [--seconds 600]``.

A ``dicomgw run`` process (its own config and spool in a temp dir, ``network_timeout_s`` 2 s, ARTIM 1 s)
gets, from ``--clients`` threads at once, byte streams made from valid seeds (A-ASSOCIATE-RQ + C-STORE of a
small CT data set + A-RELEASE-RQ; A-ASSOCIATE-RQ + C-ECHO; the same with several PDVs) and mutated: bit
flips, bytes set to 0x00/0xFF/0x7F/0x80, a 32-bit field set to a large length, truncation, a slice
duplicated or removed, random bytes inserted. Each stream is sent and the answers read until the SCP
closes the connection. Checked, and printed as one JSON object on the last line:
- no crash (the process is alive at the end), no hang (every connection ends within the network timeout
  plus a margin after its last byte), no traceback in the gateway's log;
- no Success for a stream that does not carry the data set whole: every instance the SCP answered
  Success for is in the queue, and its stored data set is a byte-for-byte slice of what was sent;
- RSS (VmRSS) back within 50 MB of its value at the start; a normal storescu push served afterwards.
Exit status 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from adapters.lab.localpeers import free_port, nodelay_env, port_open
from adapters.lab.synthetic import generate_ct_study
from tests import rawdicom as raw

REPO = Path(__file__).resolve().parent.parent
NETWORK_TIMEOUT_S = 2.0


def seeds() -> list[bytes]:
    release = struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4
    ds = raw.dataset(raw.CT_STORAGE, "1.2.826.0.1.3680043.9.7433.1.1", pixel_bytes=512)
    store = raw.associate_rq() + raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, "1.2.826.0.1.3680043.9.7433.1.1")))
    return [
        store + raw.pdata((1, 0x02, ds)) + release,
        store + raw.pdata((1, 0x00, ds[:200])) + raw.pdata((1, 0x02, ds[200:])) + release,
        raw.associate_rq() + raw.pdata((3, 0x03, raw.c_echo_rq())) + release,
    ]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        kind = rng.randrange(7)
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01))
        elif kind == 2 and at + 4 <= len(out):
            out[at : at + 4] = struct.pack(">I", rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x01000000, 65536, 0)))
        elif kind == 3:
            del out[rng.randrange(1, len(out) + 1):]
        elif kind == 4:
            end = min(len(out), at + rng.randint(1, 64))
            out[at:at] = out[at:end]
        elif kind == 5:
            del out[at : at + rng.randint(1, 16)]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(out)


def exchange(port: int, stream: bytes) -> tuple[str, list[bytes]]:
    """('closed' | 'hang' | 'refused', P-DATA bodies answered)."""
    answers: list[bytes] = []
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return "refused", answers
    with sock:
        try:
            sock.sendall(stream)
        except OSError:
            pass
        deadline = time.monotonic() + NETWORK_TIMEOUT_S + 8
        buffer = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "hang", answers
            sock.settimeout(left)
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                return "hang", answers
            except OSError:
                piece = b""
            if not piece:
                return "closed", answers
            buffer += piece
            while len(buffer) >= 6:
                pdu_type, _r, length = struct.unpack_from(">BBI", buffer)
                if len(buffer) < 6 + length:
                    break
                if pdu_type == 0x04:
                    answers.append(buffer[6 : 6 + length])
                buffer = buffer[6 + length :]


def successes(answers: list[bytes]) -> int:
    """C-STORE-RSP (0x8001) with status Success in the answers."""
    count = 0
    for body in answers:
        data = body[6:]
        fields, pos = {}, 0
        while pos + 8 <= len(data):
            group, elem, length = struct.unpack_from("<HHI", data, pos)
            fields[(group, elem)] = data[pos + 8 : pos + 8 + length]
            pos += 8 + length
        if fields.get((0, 0x0100), b"")[:2] == b"\x01\x80" and fields.get((0, 0x0900), b"\xff\xff")[:2] == b"\0\0":
            count += 1
    return count


def data_set_bytes(stream: bytes) -> bytes:
    """The data set fragments of a (mutated) stream, joined in order: its PDUs and PDVs as far as they
    parse. A stored data set must be a slice of this, or the SCP stored something that was not sent."""
    out, pos = bytearray(), 0
    while pos + 6 <= len(stream):
        pdu_type, _r, length = struct.unpack_from(">BBI", stream, pos)
        body = stream[pos + 6 : pos + 6 + length]
        pos += 6 + length
        if pdu_type != 0x04:
            continue
        at = 0
        while at + 6 <= len(body):
            pdv_length, _ctx, flags = struct.unpack_from(">IBB", body, at)
            if not flags & 0x01:
                out += body[at + 6 : at + 4 + pdv_length]
            at += 4 + max(pdv_length, 2)
    return bytes(out)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dataset_of(path: Path) -> bytes:
    data = path.read_bytes()
    start = data.index(b"DICM") + 4
    meta = 12 + int.from_bytes(data[start + 8 : start + 12], "little")
    return data[start + meta :]


def run(seconds: float, clients: int = 8, seed: int = 1) -> dict:
    work = Path(tempfile.mkdtemp(prefix="dicomgw-fuzz-"))
    port = free_port()
    config = work / "gateway.toml"
    config.write_text(
        f'[dicom]\nport = {port}\nnetwork_timeout_s = {NETWORK_TIMEOUT_S}\nartim_timeout_s = 1\nmax_associations = 32\n'
        '[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "quarantine"\n'
        '[queue]\ndb_url = "sqlite:///queue.db"\nstable_age_s = 3600\n'
    )
    log_path = work / "gateway.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    outcomes: Counter[str] = Counter()
    sent_streams: list[bytes] = []
    answered_success = 0
    lock = threading.Lock()
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"gateway did not start; see {log_path}")
            time.sleep(0.05)
        exchange(port, seeds()[2])  # warm up before the RSS baseline
        rss_start = rss_mb(proc.pid)
        rss_peak = rss_start
        pool = seeds()
        stop_at = time.monotonic() + seconds

        def client(index: int) -> None:
            nonlocal answered_success, rss_peak
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < stop_at:
                stream = mutate(rng.choice(pool), rng)
                outcome, answers = exchange(port, stream)
                ok = successes(answers)
                with lock:
                    outcomes[outcome] += 1
                    answered_success += ok
                    sent_streams.append(data_set_bytes(stream))
                    rss_peak = max(rss_peak, rss_mb(proc.pid))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 60)
        time.sleep(NETWORK_TIMEOUT_S + 1)  # connections still open end by the SCP's own timeout
        rss_end = rss_mb(proc.pid)
        with sqlite3.connect(f"file:{work / 'queue.db'}?mode=ro", uri=True) as db:
            stored = db.execute("SELECT sop_instance_uid, spool_path FROM instances").fetchall()
        mismatched = [uid for uid, rel in stored
                      if not any(dataset_of(work / "spool" / rel) in stream for stream in sent_streams)]
        fuzzed_stored = len(stored)
        study = generate_ct_study(work / "after", series=1, slices_per_series=3, rows=32, columns=32)
        after = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1", str(port),
                                *map(str, study.files)], env=nodelay_env(), capture_output=True, timeout=60)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = log_path.read_text(errors="replace")
    result = {
        "seconds": seconds, "clients": clients, "cases": sum(outcomes.values()), "outcomes": dict(outcomes),
        "success_answers": answered_success, "instances_stored": fuzzed_stored, "stored_not_as_sent": len(mismatched),
        "tracebacks": text.count("Traceback"), "alive": alive, "rss_start_mb": round(rss_start, 1),
        "rss_peak_mb": round(rss_peak, 1), "rss_end_mb": round(rss_end, 1),
        "storescu_after": after.returncode == 0, "workdir": str(work),
    }
    result["ok"] = (alive and outcomes["hang"] == 0 and result["tracebacks"] == 0 and not mismatched
                    and rss_end - rss_start < 50 and result["storescu_after"])
    if result["ok"]:  # a failing run keeps its log, spool and quarantine for the reader
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = run(args.seconds, args.clients, args.seed)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
