"""Import benchmark (issue 4): how fast the receiving gateway's PACS client stores a ~200 MB CT study
(400 slices of 512x512 16-bit) into Orthanc, against dcmtk ``storescu`` into the same kind of Orthanc.

Each row gets a fresh Orthanc (Debian's package, SyncStorageArea on, own config in a temp dir):
  storescu          dcmtk storescu with TCP_NODELAY=1 (the reference: what a modality sending straight costs);
  gateway_1         the gateway's PACS client (``adapters.pacs.PacsClient``) over one association;
  gateway_2         the same over two associations (``associations_per_study = 2``, the default);
and the same three into an Orthanc started without TCP_NODELAY=1, as Debian starts it (Nagle's algorithm on:
dcmtk then holds the second segment of each response until the first is acknowledged, ~40 ms per instance
unless the client acknowledges at once). The Nagle rows send ``--nagle-slices`` instances only (the stall
makes storescu take ~44 ms each); their figure is seconds per 100 instances.
Medians of ``--runs``; every run checks that Orthanc holds every SOP Instance UID. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from adapters.dicom_files import inspect_part10_file
from adapters.lab.localpeers import Orthanc, nodelay_env, orthanc_instances
from adapters.lab.synthetic import generate_ct_study
from adapters.pacs import PacsClient
from gateway.importing import PacsOutcome, Verdict
from gateway.model import InstanceRecord
from gateway.settings import PacsSettings


def _records(files: list[Path]) -> list[InstanceRecord]:
    now = datetime.now()
    records = []
    for path in files:
        h = inspect_part10_file(path)
        records.append(InstanceRecord(h.sop_instance_uid, h.sop_class_uid, h.transfer_syntax_uid, h.series_instance_uid, None,
                                      "", h.modality, None, path.stat().st_size, "", str(path), False, "bench", now))
    return records


def _one(root: Path, files: list[Path], sender: str, nagle: bool) -> float:
    with Orthanc(root / "orthanc", ae_title="PACS", nagle=nagle) as orthanc:
        orthanc.start()
        started = time.perf_counter()
        if sender == "storescu":
            done = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", str(orthanc.dicom_port),
                                   *map(str, files)], env=nodelay_env(), capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
        else:
            client = PacsClient(PacsSettings(ae_title="PACS", host="127.0.0.1", port=orthanc.dicom_port, calling_ae_title="GATEWAY",
                                             associations_per_study=int(sender[-1])), Path("/"))
            outcomes: dict[str, PacsOutcome] = {}
            client.store(_records(files), lambda i, o: outcomes.__setitem__(i.sop_instance_uid, o))
            if {o.verdict for o in outcomes.values()} != {Verdict.STORED} or len(outcomes) != len(files):
                raise RuntimeError(f"not every instance stored: {outcomes}")
        seconds = time.perf_counter() - started
        if len(orthanc_instances(orthanc)) != len(files):
            raise RuntimeError("Orthanc does not hold every instance")
    shutil.rmtree(root / "orthanc", ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--nagle-slices", type=int, default=40)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicomgw-bench-import-"))
    senders = ("storescu", "gateway_1", "gateway_2")
    try:
        study = generate_ct_study(root / "study", series=1, slices_per_series=args.slices)
        small = study.files[: args.nagle_slices]
        mb = study.size_bytes / 1e6
        print(f"study: {len(study.files)} instances, {mb:.1f} MB; Nagle rows: {len(small)} instances; median of {args.runs}", flush=True)
        seconds: dict[str, float] = {}
        for nagle, files in ((False, study.files), (True, small)):
            times: dict[str, list[float]] = {s: [] for s in senders}
            for _run in range(args.runs):  # interleaved, so that a slow moment of the machine hits every row
                for sender in senders:
                    times[sender].append(_one(root, files, sender, nagle))
            for sender in senders:
                key = sender + ("_nagle" if nagle else "")
                seconds[key] = statistics.median(times[sender])
                print(f"  {key:18s} {seconds[key]:7.2f} s  ({len(files) / seconds[key]:6.0f} instances/s)", flush=True)
        per_100_nagle = {s: seconds[s + "_nagle"] * 100 / len(small) for s in senders}
        result = {
            "instances": len(study.files), "mb": round(mb, 1),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "mb_s": {s: round(mb / seconds[s], 1) for s in senders},
            "ratio_gateway_1_vs_storescu": round(seconds["storescu"] / seconds["gateway_1"], 3),
            "ratio_gateway_2_vs_storescu": round(seconds["storescu"] / seconds["gateway_2"], 3),
            "nagle_s_per_100_instances": {s: round(v, 2) for s, v in per_100_nagle.items()},
            "nagle_ratio_gateway_2_vs_storescu": round(per_100_nagle["storescu"] / per_100_nagle["gateway_2"], 2),
        }
        print(f"gateway vs storescu (higher is faster): 1 association {result['ratio_gateway_1_vs_storescu']}, "
              f"2 associations {result['ratio_gateway_2_vs_storescu']}; into an Orthanc with Nagle on: "
              f"{result['nagle_ratio_gateway_2_vs_storescu']}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
