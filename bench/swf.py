"""Scheduled Workflow benchmark (issue 17 §2): ``bash bench/swf [--slices 40] [--stable-age 30]``.

A STAT CT study goes through both gateways (real ``dicomgw run`` processes, Prosody on loopback, end-to-end
encrypted) into Orthanc behind B, twice: once with the modality's MPPS (pynetdicom N-CREATE before the images,
N-SET COMPLETED after the last C-STORE response), once without (the stable-age rule, ``--stable-age`` seconds,
as at a site whose modalities send no MPPS). Each time runs from the last C-STORE response (dcmtk's storescu
returned) to the moment Orthanc holds every instance (REST ``/tools/lookup``). The stable-age case is the
reference: the same kind of study, the same gateways, server and PACS, in the same run.

The last line is one JSON object: ``mpps_s``, ``stable_age_s_case``, ``mpps_vs_stable_age`` (goal <= 0.2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

from adapters.lab.localpeers import Orthanc, Prosody
from adapters.lab.modality import send_mpps
from adapters.lab.synthetic import generate_ct_study
from bench.priority import RULES, in_pacs, push
from bench.transfer import DOMAIN, GatewayProcess, identity

A_USER, B_USER = "radiology.hospital-a", "radiology.hospital-b"


def to_pacs(orthanc: Orthanc, study: object, started: float, timeout_s: float) -> float:
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if in_pacs(orthanc, study.study_instance_uid) == len(study.files):  # type: ignore[attr-defined]
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError("the study did not reach B's PACS")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--stable-age", type=float, default=30.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomgw-swf-"))
    server = Prosody(work / "prosody", domain=DOMAIN)
    for user in (A_USER, B_USER):
        server.add_account(user, f"pw-{user}")
    orthanc = Orthanc(work / "orthanc")
    a = b = None
    try:
        server.start()
        orthanc.start()
        a_fp, b_fp = identity(work / "a"), identity(work / "b")
        b = GatewayProcess(work / "b", B_USER, server, A_USER, peer_fingerprint=a_fp)
        b.text += f'[pacs]\nae_title = "{orthanc.ae_title}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        a = GatewayProcess(work / "a", A_USER, server, B_USER, B_USER, peer_fingerprint=b_fp)
        a.text = a.text.replace("stable_age_s = 0.3", f"stable_age_s = {args.stable_age:g}") + RULES
        b.start()
        a.start()
        time.sleep(3)  # both online, each other's presence seen
        results = {}
        for case, seed in (("mpps", 21), ("stable_age", 22)):
            study = generate_ct_study(work / case, 1, args.slices, seed=seed, study_description="CT TRAUMA HEAD")
            step = generate_uid()
            if case == "mpps":
                send_mpps(a.port, "DICOMGW", study, step, "create")
            push(a, study.files)
            started = time.monotonic()  # the last C-STORE response
            if case == "mpps":
                send_mpps(a.port, "DICOMGW", study, step, "complete")
            results[case] = to_pacs(orthanc, study, started, args.stable_age * 4 + 120)
            print(f"{case}: {results[case]:.2f} s from the last C-STORE response to B's PACS ({len(study.files)} instances)",
                  flush=True)
        print(json.dumps({"slices": args.slices, "stable_age_s": args.stable_age, "mpps_s": round(results["mpps"], 3),
                          "stable_age_s_case": round(results["stable_age"], 3),
                          "mpps_vs_stable_age": round(results["mpps"] / results["stable_age"], 3)}))
    finally:
        for process in (a, b):
            if process is not None:
                process.stop()
        orthanc.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
